"""Memory planner: how many KV blocks fit next to the weights, as vLLM sizes its pool."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from servesim.sim.errors import CapacityError

from .catalog import DATA, GIB, GPU, ModelSpec, load_yaml


@lru_cache(maxsize=None)
def engine_constants() -> dict:
    return {k: v["value"] for k, v in load_yaml(DATA / "engine.yaml").items()}


def dtype_bytes(dtype: str) -> int:
    table = engine_constants()["dtype_bytes"]
    if dtype not in table:
        raise CapacityError(f"unknown dtype {dtype!r}; known: {', '.join(table)}")
    return table[dtype]


def kv_bytes_per_token(model: ModelSpec, tp: int, pp: int, kv_dtype: str) -> float:
    """KV bytes one token occupies on one GPU of the replica (K and V, all its layers)."""
    layers = math.ceil(model.num_layers / pp)
    b = dtype_bytes(kv_dtype)
    if model.attention == "mla":  # one latent (kv_lora_rank + rope dims) per token, replicated over TP
        return layers * (model.mla_kv_lora_rank + model.mla_qk_rope_head_dim) * b
    kv_heads = math.ceil(model.num_kv_heads / tp)  # heads are replicated when tp > kv heads
    return layers * 2 * kv_heads * model.head_dim * b


def activation_bytes(model: ModelSpec, tp: int, dtype: str, max_num_batched_tokens: int, max_num_seqs: int) -> float:
    """Peak activations of the largest step (vLLM profiles a dummy run of max_num_batched_tokens)."""
    h, d = model.hidden_size, model.head_dim
    inter = model.intermediate_size * max(1, model.experts_per_token)
    per_token = 2 * h + (model.num_attention_heads + 2 * model.num_kv_heads) * d / tp + 3 * inter / tp
    logits = max_num_seqs * model.vocab_size / tp * engine_constants()["logits_bytes_per_element"]
    return max_num_batched_tokens * per_token * dtype_bytes(dtype) + logits


@dataclass(frozen=True)
class MemoryPlan:
    gpu_bytes: float
    budget_bytes: float
    weight_bytes: float
    activation_bytes: float
    overhead_bytes: float
    kv_bytes_per_token: float
    block_size: int
    num_blocks: int

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        g = lambda x: f"{x / GIB:.2f} GiB"  # noqa: E731
        return (f"per GPU: memory {g(self.gpu_bytes)} x utilization = {g(self.budget_bytes)}; "
                f"weights {g(self.weight_bytes)}, activations {g(self.activation_bytes)}, "
                f"runtime overhead {g(self.overhead_bytes)}; KV {self.kv_bytes_per_token:.0f} B/token "
                f"-> {self.num_blocks} blocks of {self.block_size} tokens")


def plan_memory(model: ModelSpec, gpu: GPU, *, tp: int = 1, pp: int = 1, dtype: str = "bf16",
                kv_dtype: str = "bf16", block_size: int = 16, gpu_memory_utilization: float = 0.9,
                max_num_batched_tokens: int = 8192, max_num_seqs: int = 256,
                runtime_overhead_gib: float | None = None) -> MemoryPlan:
    budget = gpu.memory_bytes * gpu_memory_utilization
    weights = model.params * dtype_bytes(dtype) / (tp * pp)
    act = activation_bytes(model, tp, dtype, max_num_batched_tokens, max_num_seqs)
    if runtime_overhead_gib is None:
        runtime_overhead_gib = engine_constants()["runtime_overhead_gib"]
    overhead = runtime_overhead_gib * GIB
    per_token = kv_bytes_per_token(model, tp, pp, kv_dtype)
    free = budget - weights - act - overhead
    blocks = int(free // (per_token * block_size)) if free > 0 else 0
    plan = MemoryPlan(gpu.memory_bytes, budget, weights, act, overhead, per_token, block_size, blocks)
    if blocks < 1:
        raise CapacityError(
            f"model {model.name} does not fit on {tp * pp} x {gpu.name} (tp={tp}, pp={pp}, {dtype}): "
            f"{plan.describe()}; free for KV cache {free / GIB:.2f} GiB. "
            f"Use more GPUs (tensor_parallel_size), a smaller dtype, or a larger gpu_memory_utilization.")
    return plan
