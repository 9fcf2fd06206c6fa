"""GPU and model catalogs, read from the data files under hwmodels/data/."""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from servesim.sim.errors import ConfigError

DATA = Path(__file__).parent / "data"
GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: float
    mem_bw: float            # bytes/s, peak
    bf16_flops: float        # FLOP/s, dense peak
    fp8_flops: float | None
    link_bw: float | None    # bytes/s per direction to peers in the node
    usd_per_hour: float | None
    compute_efficiency: float
    memory_efficiency: float
    kernel_floor_s: float
    source: str
    fp32_flops: float | None = None      # measured devices (servesim calibrate): the fp32 peak
    gpus_per_node: int | None = None     # GPUs in one server; collectives of larger groups cross the network
    inter_node_bw: float | None = None   # bytes/s per GPU per direction to other servers (InfiniBand/RoCE)

    def peak_flops(self, dtype: str) -> float:
        """Tensor-core peak for a precision profile; weight-only int8/int4 compute in bf16."""
        if dtype == "fp8":
            if not self.fp8_flops:
                raise ConfigError(f"gpu {self.name} has no fp8 tensor cores in the catalog; use dtype bf16")
            return self.fp8_flops
        if dtype == "fp32":
            if not self.fp32_flops:
                raise ConfigError(f"gpu {self.name} has no fp32 peak in the catalog (fp32 is for devices measured by "
                                  "servesim calibrate); use dtype bf16")
            return self.fp32_flops
        return self.bf16_flops


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    params: float
    active_params: float
    num_experts: int = 0
    experts_per_token: int = 0
    shared_experts: int = 0
    attention: str = "gqa"
    mla_kv_lora_rank: int = 0
    mla_qk_rope_head_dim: int = 0
    tie_word_embeddings: bool = False
    mla_q_lora_rank: int = 0
    mla_qk_nope_head_dim: int = 0
    mla_v_head_dim: int = 0
    first_k_dense_layers: int = 0      # MoE models whose first layers have a dense MLP (DeepSeek)
    dense_intermediate_size: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def load_yaml(path) -> dict:
    """A data file, parsed with libyaml where PyYAML has it (5-10x faster than the pure-Python loader)."""
    with open(path) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _load(name: str) -> dict:
    return load_yaml(DATA / name)


def _resolve(table: dict, key: str, what: str) -> str:
    if key in table:
        return key
    for name, entry in table.items():
        if key in entry.get("aliases", []) or key.lower() == name.lower():
            return name
    names = sorted(list(table) + [a for e in table.values() for a in e.get("aliases", [])])
    near = difflib.get_close_matches(key, names, n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    if what == "gpu" and key.startswith("local-"):
        hint += ("; a device of this machine is measured first: servesim calibrate --backend numpy "
                 "(or servesim validate, which calibrates on first use)")
    raise ConfigError(f"unknown {what} {key!r}{hint} (known: {', '.join(sorted(table))})")


PROFILES = DATA / "profiles"


def user_profile_dir() -> Path:
    """Where `servesim calibrate` writes device profiles: $SERVESIM_PROFILES, else ~/.servesim/profiles."""
    return Path(os.environ.get("SERVESIM_PROFILES", Path.home() / ".servesim" / "profiles"))


def profile_dirs() -> list[Path]:
    """Where device profiles live: the package's own, then the user's."""
    return [PROFILES, user_profile_dir()]


def profile_documents() -> list[dict]:
    return _profile_documents(tuple(profile_dirs()))


@lru_cache(maxsize=None)
def _profile_documents(dirs: tuple) -> list[dict]:
    docs = []
    for d in dirs:
        for p in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            try:
                doc = load_yaml(p) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{p}: not a valid profile: {e}") from None
            docs.append(doc)
    return docs


def gpu_table() -> dict:
    """The GPU catalog plus devices defined by profiles (measured by `servesim calibrate`)."""
    table = dict(_load_cached("gpus.yaml"))
    for doc in profile_documents():
        table.update(doc.get("devices") or {})
    return table


@lru_cache(maxsize=None)
def _load_cached(name: str) -> dict:
    return _load(name)


@lru_cache(maxsize=None)
def model_table() -> dict:
    return _load("models.yaml")


def get_gpu(key: str) -> GPU:
    return _get_gpu(key, tuple(profile_dirs()))


@lru_cache(maxsize=None)
def _get_gpu(key: str, dirs: tuple) -> GPU:
    name = _resolve(gpu_table(), key, "gpu")
    e = gpu_table()[name]
    for req in ("memory_gb", "mem_bw_tbps", "bf16_tflops"):
        if e.get(req) is None:
            raise ConfigError(f"gpu {name} lacks {req} in the catalog; it cannot be simulated")
    link = e.get("intra_node_bw_gbps")
    return GPU(
        name=name,
        memory_bytes=e["memory_gb"] * GIB,  # aiconfigurator gives NVIDIA capacities in GiB (e.g. 85899345920 B)
        mem_bw=e["mem_bw_tbps"] * 1e12,
        bf16_flops=e["bf16_tflops"] * 1e12,
        fp8_flops=e["fp8_tflops"] * 1e12 if e.get("fp8_tflops") else None,
        link_bw=link * 1e9 if link else None,
        usd_per_hour=e.get("usd_per_hour"),
        compute_efficiency=e["compute_efficiency"],
        memory_efficiency=e["memory_efficiency"],
        kernel_floor_s=e["kernel_floor_us"] * 1e-6,
        source=e["source"],
        fp32_flops=e["fp32_tflops"] * 1e12 if e.get("fp32_tflops") else None,
        gpus_per_node=e.get("gpus_per_node"),
        inter_node_bw=e["inter_node_bw_gbps"] * 1e9 if e.get("inter_node_bw_gbps") else None,
    )


@lru_cache(maxsize=None)
def get_model(key: str) -> ModelSpec:
    name = _resolve(model_table(), key, "model")
    e = model_table()[name]
    if e.get("attention") == "mla":
        head_dim = e.get("head_dim") or 128  # MLA: qk_nope_head_dim 128 (models.csv notes)
    else:
        head_dim = e.get("head_dim") or e["hidden_size"] // e["num_attention_heads"]
    return ModelSpec(
        name=name,
        num_layers=e["num_layers"],
        hidden_size=e["hidden_size"],
        intermediate_size=e["intermediate_size"],
        num_attention_heads=e["num_attention_heads"],
        num_kv_heads=e["num_kv_heads"],
        head_dim=head_dim,
        vocab_size=e["vocab_size"],
        max_position_embeddings=e["max_position_embeddings"],
        params=e["params_b"] * 1e9,
        active_params=e["active_params_b"] * 1e9,
        num_experts=e.get("num_experts") or 0,
        experts_per_token=e.get("experts_per_token") or 0,
        shared_experts=e.get("shared_experts") or 0,
        attention=e.get("attention", "gqa"),
        mla_kv_lora_rank=e.get("mla_kv_lora_rank") or 0,
        mla_qk_rope_head_dim=e.get("mla_qk_rope_head_dim") or 0,
        tie_word_embeddings=bool(e.get("tie_word_embeddings", False)),
        mla_q_lora_rank=e.get("mla_q_lora_rank") or 0,
        mla_qk_nope_head_dim=e.get("mla_qk_nope_head_dim") or 0,
        mla_v_head_dim=e.get("mla_v_head_dim") or 0,
        first_k_dense_layers=e.get("first_k_dense_layers") or 0,
        dense_intermediate_size=e.get("dense_intermediate_size") or 0,
    )
