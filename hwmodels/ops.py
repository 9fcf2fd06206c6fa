"""Cost of one operator: its FLOPs and bytes moved, and the time the roofline gives them.

time = max(flops / (peak x compute_efficiency), bytes / (bandwidth x memory_efficiency)) + kernel floor.
These primitives are shared by the step-time model (roofline.py), `estimate` and the accuracy check
against measured kernels (accuracy.py), so one formula serves all three.
"""
from __future__ import annotations

from .catalog import GPU


def roofline_time(gpu: GPU, flops: float, nbytes: float, dtype: str = "bf16") -> float:
    return max(flops / (gpu.peak_flops(dtype) * gpu.compute_efficiency),
               nbytes / (gpu.mem_bw * gpu.memory_efficiency)) + gpu.kernel_floor_s


def gemm(m: float, n: float, k: float, w_bytes: float = 2, in_bytes: float = 2, out_bytes: float = 2):
    """C[m,n] = A[m,k] B[k,n]: weights B are read once, activations A in, C out."""
    return 2.0 * m * n * k, k * n * w_bytes + m * k * in_bytes + m * n * out_bytes


def attention(new: float, cached: float, heads: float, kv_heads: float, head_dim: float,
              kv_bytes: float = 2, act_bytes: float = 2):
    """One sequence: `new` query tokens attend causally to `cached` + themselves (FlashAttention-style:
    K and V read once, Q in, O out). A decode is new=1."""
    hd = heads * head_dim
    flops = 4.0 * hd * new * (cached + (new + 1) / 2)
    nbytes = (cached + new) * 2 * kv_heads * head_dim * kv_bytes + 2 * new * hd * act_bytes
    return flops, nbytes


def ring_all_reduce_time(nbytes: float, n: int, link_bw: float, alpha: float) -> float:
    """Ring all-reduce: 2(n-1) steps, each moving nbytes/n over one link."""
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / link_bw


def ring_all_gather_time(nbytes: float, n: int, link_bw: float, alpha: float) -> float:
    """Ring all-gather of an nbytes result: (n-1) steps of nbytes/n each."""
    return (n - 1) * alpha + (n - 1) / n * nbytes / link_bw


def send_recv_time(nbytes: float, link_bw: float, alpha: float) -> float:
    return alpha + nbytes / link_bw
