"""Cost of one operator: FLOPs and bytes moved, and the time a GPU profile gives them.

Shared by the step-time model (roofline.py), `estimate` and the accuracy check against measured
kernels (accuracy.py, fit.py), so one formula serves all of them.
"""
from __future__ import annotations

import math
from functools import lru_cache

# vLLM's custom all-reduce serves messages up to 8 MiB inside a node (CustomAllreduce max_size
# default, vllm/distributed/device_communicators/custom_all_reduce.py); larger ones go to NCCL.
CUSTOM_ALL_REDUCE_MAX_BYTES = 8 * 1024 * 1024


def gemm(m: float, n: float, k: float, w_bytes: float = 2, in_bytes: float = 2, out_bytes: float = 2):
    """C[m,n] = A[m,k] B[k,n]: weights B are read once, activations A in, C out."""
    return 2.0 * m * n * k, k * n * w_bytes + m * k * in_bytes + m * n * out_bytes


def attention(new: float, cached: float, heads: float, kv_heads: float, head_dim: float,
              kv_bytes: float = 2, act_bytes: float = 2):
    """One sequence: `new` query tokens attend causally to `cached` + themselves (FlashAttention-style:
    K and V read once, Q in, O out). A decode is new=1. Useful FLOPs and bytes."""
    hd = heads * head_dim
    flops = 4.0 * hd * new * (cached + (new + 1) / 2)
    nbytes = (cached + new) * 2 * kv_heads * head_dim * kv_bytes + 2 * new * hd * act_bytes
    return flops, nbytes


def attention_time(p, seqs, heads, kv_heads, head_dim, kv_bytes, act_bytes, peak, bw):
    """Time, useful FLOPs and bytes of one attention kernel over [(new, cached), ...] sequences,
    with the profile's per-sequence overhead s0 (a sequence of KV length L runs at L / (L + s0)). A naive
    kernel (profile flag; the measured CPU backend's) also pays the full new x L score square in FLOPs and
    writes it out (heads x new x L elements); FlashAttention-style kernels keep scores on chip."""
    s0 = p.seq_overhead
    kv_tok = 2 * kv_heads * head_dim * kv_bytes
    f_sum = b_sum = f_eff = b_eff = 0.0
    for new, cached in seqs:
        f, b = attention(new, cached, heads, kv_heads, head_dim, kv_bytes, act_bytes)
        f_sum += f
        b_sum += b
        L = cached + new
        if p.naive:   # the whole new x L score square is computed and written out, causal mask or not
            f = 4.0 * heads * head_dim * new * L
            b_eff += heads * new * L * act_bytes
        f_eff += f * (1 + s0 / L)
    t = p.time(f_eff, b_sum + b_eff + len(seqs) * s0 * kv_tok, peak, bw)
    return t, f_sum, b_sum


def ring_all_reduce_time(nbytes: float, n: int, link_bw: float, alpha: float, eta: float = 1.0,
                         base: float = 0.0) -> float:
    """All-reduce in the alpha-beta form: a fixed cost per call, 2(n-1) steps of alpha, and the ring's
    2(n-1)/n x nbytes of traffic per GPU at eta x link bandwidth."""
    return base + 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / (link_bw * eta)


def ring_all_gather_time(nbytes: float, n: int, link_bw: float, alpha: float, eta: float = 1.0,
                         base: float = 0.0) -> float:
    """All-gather of an nbytes result: (n-1) steps, (n-1)/n x nbytes of traffic per GPU."""
    return base + (n - 1) * alpha + (n - 1) / n * nbytes / (link_bw * eta)


def send_recv_time(nbytes: float, link_bw: float, alpha: float, eta: float = 1.0, base: float = 0.0) -> float:
    return base + alpha + nbytes / (link_bw * eta)


def collective_time(kind: str, nbytes: float, n: int, link_bw: float, alpha: float, eta: float, base: float) -> float:
    """One protocol's alpha-beta time for a collective kind (all_reduce*, all_gather, send_recv*); `link_bw` is
    the bandwidth of the slowest hop (inter_node_bandwidth() for the *_inter kinds)."""
    if kind == "all_gather":
        return ring_all_gather_time(nbytes, n, link_bw, alpha, eta, base)
    if kind.startswith("send_recv"):
        return send_recv_time(nbytes, link_bw, alpha, eta, base)
    return ring_all_reduce_time(nbytes, n, link_bw, alpha, eta, base)


def inter_node_bandwidth(kind: str, inter_node_bw: float, per_node: int) -> float:
    """Bandwidth of the network hop of a collective spanning servers. An all-reduce runs one ring per NIC
    (NCCL, one NIC per GPU): each of the per_node rings carries 1/per_node of the message over its own NIC,
    so the message sees per_node x the per-GPU bandwidth; a send/recv crosses one NIC."""
    return inter_node_bw * (per_node if kind.startswith("all_reduce") else 1)


def all_reduce_time(profile, nbytes: float, n: int, link_bw: float) -> float:
    """vLLM's choice: the custom all-reduce for small messages when a fit exists, NCCL otherwise."""
    custom = profile.link("all_reduce_custom")
    if custom.fitted and nbytes <= CUSTOM_ALL_REDUCE_MAX_BYTES:
        return custom.time("all_reduce", nbytes, n, link_bw)
    return profile.link("all_reduce").time("all_reduce", nbytes, n, link_bw)


def moe_imbalance(assignments: float, ranks: int) -> float:
    """Expected busiest-rank load over the mean when `assignments` token-to-expert choices land uniformly
    on `ranks` expert-parallel ranks. Each rank's load is multinomial, approximated as normal with
    mean N/n and sd sqrt(N (1/n)(1 - 1/n)); the busiest of n is mean + sd x E[max of n standard normals].
    1 for one rank."""
    if ranks <= 1 or assignments <= 0:
        return 1.0
    mean = assignments / ranks
    sd = math.sqrt(assignments * (1 / ranks) * (1 - 1 / ranks))
    return 1.0 + sd * expected_max_normal(ranks) / mean


@lru_cache(maxsize=None)
def expected_max_normal(n: int) -> float:
    """E[max of n i.i.d. standard normals] = integral of x n phi(x) Phi(x)^(n-1) dx."""
    from scipy import integrate, special
    pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)    # noqa: E731 (the standard normal density)
    val, _ = integrate.quad(lambda x: x * n * pdf(x) * special.ndtr(x) ** (n - 1), -12, 12)
    return val
