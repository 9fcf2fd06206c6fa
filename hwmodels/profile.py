"""Per-GPU, per-op-class cost parameters: fitted ones from hwmodels/data/profiles/*.yaml, else catalog defaults.

An op of class c with FLOPs F and bytes B on sequences of KV length L takes
    max(F (1 + s0/L) / (peak x e) + a,  (B + n_seq x s0 x kv_bytes) / (bandwidth x m) + b)
e, m: sustained fractions of peak; a, b: fixed costs (launch, tail); s0: per-sequence attention
overhead in virtual keys (a sequence of length L runs at efficiency L / (L + s0)); s0 = 0 outside
attention. Collectives follow alpha-beta, base + steps x alpha + traffic / (link bandwidth x eta), taking the
fastest of the fitted protocols; the *_inter classes are collectives between servers, over the network bandwidth (ops.inter_node_bandwidth).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from .catalog import GPU, PROFILES, profile_documents

OP_CLASSES = ("gemm", "gemm_fp8", "gemv", "attn_prefill", "attn_decode", "norm", "add", "rope", "act")
LINK_CLASSES = ("all_reduce", "all_reduce_custom", "all_gather", "send_recv", "all_reduce_inter", "send_recv_inter")


@dataclass(frozen=True)
class OpParams:
    compute_efficiency: float
    memory_efficiency: float
    compute_offset_s: float
    memory_offset_s: float
    seq_overhead: float = 0.0
    fitted: bool = False
    naive: bool = False   # attention kernel that materializes the scores (numpy/torch CPU): see ops.attention_time

    def time(self, flops: float, nbytes: float, peak: float, bw: float) -> float:
        return max(flops / (peak * self.compute_efficiency) + self.compute_offset_s,
                   nbytes / (bw * self.memory_efficiency) + self.memory_offset_s)

    def scaled(self, f: float) -> "OpParams":
        """The same op taking f times as long for every shape (both roofline terms scale by f)."""
        return replace(self, compute_efficiency=self.compute_efficiency / f, memory_efficiency=self.memory_efficiency / f,
                       compute_offset_s=self.compute_offset_s * f, memory_offset_s=self.memory_offset_s * f)


@dataclass(frozen=True)
class LinkParams:
    """One or more protocols, each (alpha_s, bw_efficiency, base_s); a collective takes the fastest, as
    NCCL's tuner picks LL/LL128/Simple by message size."""
    protocols: tuple
    fitted: bool = False

    def time(self, kind: str, nbytes: float, n: int, link_bw: float) -> float:
        from .ops import collective_time
        return min(collective_time(kind, nbytes, n, link_bw, a, e, b) for a, e, b in self.protocols)

    def scaled(self, f: float) -> "LinkParams":
        """Every protocol f times as slow (alpha-beta time is linear in alpha, 1 / efficiency and base)."""
        return replace(self, protocols=tuple((a * f, e / f, b * f) for a, e, b in self.protocols))


@dataclass(frozen=True)
class Profile:
    gpu: str
    ops: dict
    links: dict

    def op(self, cls: str) -> OpParams:
        return self.ops[cls]

    def link(self, cls: str) -> LinkParams:
        return self.links[cls]

    def scaled(self, factors: dict) -> "Profile":
        """Each class's ops factors[class] times as long (hwmodels/model_error.py); classes not named unchanged."""
        return Profile(self.gpu, {c: p.scaled(factors[c]) if c in factors else p for c, p in self.ops.items()},
                       {c: p.scaled(factors[c]) if c in factors else p for c, p in self.links.items()})


def _fitted() -> dict:
    out: dict = {}
    for doc in profile_documents():
        for gpu, entry in (doc.get("gpus") or {}).items():
            out.setdefault(gpu, {}).update(entry)
    return out


def op_params(f: dict) -> OpParams:
    """OpParams of one fitted profile entry."""
    return OpParams(f["compute_efficiency"], f["memory_efficiency"], f["compute_offset_us"] * 1e-6,
                    f["memory_offset_us"] * 1e-6, f.get("seq_overhead", 0.0), True, f.get("naive_attention", False))


def link_params(f: dict) -> LinkParams:
    protos = f.get("protocols") or [f]
    return LinkParams(tuple((q["alpha_us"] * 1e-6, q["bw_efficiency"], q.get("base_us", 0.0) * 1e-6)
                            for q in protos), True)


def profile_for(gpu: GPU, alpha_default: float) -> Profile:
    """The GPU's fitted classes (the preferred stack of each; fit.py) and catalog defaults for the rest."""
    fitted = _fitted().get(gpu.name, {})
    floor = gpu.kernel_floor_s
    ops = {c: op_params(fitted[c]) if c in fitted else OpParams(gpu.compute_efficiency, gpu.memory_efficiency,
                                                                 floor, floor)
           for c in OP_CLASSES}
    links = {c: link_params(fitted[c]) if c in fitted else LinkParams(((alpha_default, 1.0, 0.0),))
             for c in LINK_CLASSES}
    return Profile(gpu.name, ops, links)
