"""Fit per-GPU, per-op-class profile parameters to measured kernels (`servesim calibrate --from-reference`).

Each reference row of hwmodels/data/reference/kernel_points.csv is mapped once, here, to an op class
with its FLOPs, bytes and sequences; parameters are fitted by least squares on log(predicted/measured)
(scipy, several starts), and every fit reports its in-sample and leave-one-out errors.

Rows are grouped by GPU, op class and software stack (the measuring framework: vLLM 0.24, NCCL 2.29 via
nccl-tests, Vidur's profiler, ...): two stacks timing the same op on the same GPU can disagree by 1.7x
(A100 all-reduce: nccl-tests vs Vidur's torch.distributed profiler), and one set of parameters cannot be
both. The simulator prices with the preferred stack of each class (STACK_PREFERENCE: the newest software);
the others are kept in the profile under `other_stacks` and scored by `servesim accuracy` too.

The loss is soft-L1 on the log ratio with a 10% scale: quadratic for errors within about 10%, linear
beyond, so one kernel-selection outlier (B200 fp8 at m=1 runs 2.5x slower than at m=16) does not drag the
fit away from the rows that follow the roofline.
"""
from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy.optimize import least_squares

from .catalog import DATA, get_gpu
from .ops import attention, attention_time, gemm, inter_node_bandwidth
from .profile import PROFILES, LinkParams, OpParams

LOSS, F_SCALE = "soft_l1", 0.1
# Newest measured software first: aiconfigurator's tables (vLLM 0.14/0.24, NCCL 2.27/2.29) over Vidur's (2024)
STACK_PREFERENCE = ("ai-dynamo/aiconfigurator", "microsoft/vidur")
KERNELS = DATA / "reference" / "kernel_points.csv"
GPU_NAMES = {"A100-80GB": "A100-80GB-SXM"}   # Vidur names the A100-80GB without its form factor
VIDUR_GEMMS = {"attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj"}
ELEMENTWISE = {"input_layernorm": "norm", "add": "add", "attn_rope": "rope", "mlp_act": "act"}
LINKS = {"allreduce": "all_reduce", "allreduce_custom": "all_reduce_custom", "allgather": "all_gather",
         "send_recv": "send_recv"}
LINK_CLASSES = set(LINKS.values()) | {"all_reduce_inter", "send_recv_inter"}


def _note(notes, key: str) -> float | None:
    m = re.search(rf"{key}=(\d+)", notes if isinstance(notes, str) else "")
    return float(m.group(1)) if m else None


def stack_name(framework: str) -> str:
    return re.sub(r"^VLLM\b", "vLLM", str(framework))


def classify(row) -> dict:
    """Op class, FLOPs, bytes, sequences and link shape of one reference row, or `why` it is not priced."""
    gpu = GPU_NAMES.get(row.gpu, row.gpu)
    base = {"gpu_name": gpu, "cls": None, "flops": 0.0, "nbytes": 0.0, "seqs": None, "why": "", "bw": np.nan,
            "stack": stack_name(row.framework)}
    op = row.op
    if op == "gemm" or op in VIDUR_GEMMS:
        if row.dtype == "nvfp4":
            return {**base, "why": "no fp4 peak in the GPU catalog"}
        if row.dtype == "fp8":
            f, b = gemm(row.m, row.n, row.k, 1, 1, 2)
            return {**base, "cls": "gemm_fp8", "flops": f, "nbytes": b}
        f, b = gemm(row.m, row.n, row.k)
        return {**base, "cls": "gemm", "flops": f, "nbytes": b}
    if op in ("prefill_attention", "decode_attention"):
        seq = (row.seq_len, 0) if op == "prefill_attention" else (1, row.seq_len - 1)
        f, b = attention(*seq, row.num_heads, row.num_kv_heads, row.head_dim)
        cls = "attn_prefill" if op == "prefill_attention" else "attn_decode"
        return {**base, "cls": cls, "flops": row.batch * f, "nbytes": row.batch * b, "seqs": [seq] * int(row.batch)}
    if op in LINKS:
        if "pairwise_nvlink" in (row.notes if isinstance(row.notes, str) else ""):
            return {**base, "why": "pairwise NVLink bridges: not the catalog GPU's NVSwitch topology"}
        per_node, nodes = _note(row.notes, "devices_per_node"), _note(row.notes, "nodes")
        dev = get_gpu(gpu)
        if (nodes or 1) > 1 and (per_node or 1) < row.num_gpus:
            cls = LINKS[op] + "_inter"
            if cls not in ("all_reduce_inter", "send_recv_inter") or not dev.inter_node_bw:
                return {**base, "why": f"{op} across servers: no inter-node model or bandwidth for {gpu}"}
            bw = inter_node_bandwidth(cls, dev.inter_node_bw, int(per_node or 1))
            return {**base, "cls": cls, "nbytes": row.bytes, "bw": bw}
        return {**base, "cls": LINKS[op], "nbytes": row.bytes, "bw": dev.link_bw or np.nan}
    if op in ELEMENTWISE:
        h, inter = _note(row.notes, "hidden"), _note(row.notes, "intermediate")
        T, tp = row.num_tokens, (row.tp if row.tp == row.tp else 1)
        nbytes = {"norm": 2 * T * h * 2, "add": 3 * T * h * 2,
                  "rope": 2 * T * (row.num_heads + row.num_kv_heads) * row.head_dim / tp * 2,
                  "act": T * 3 * inter / tp * 2}[ELEMENTWISE[op]]
        return {**base, "cls": ELEMENTWISE[op], "nbytes": nbytes}
    return {**base, "why": f"op {op} is not priced"}


def reference_rows(path: Path = KERNELS) -> pd.DataFrame:
    df = pd.read_csv(path)
    info = pd.DataFrame([classify(r) for r in df.itertuples()], index=df.index)
    return pd.concat([df, info], axis=1)


# --- op classes -----------------------------------------------------------------------------
def op_time(p: OpParams, row, peak: float, bw: float) -> float:
    if row.seqs:
        b = getattr(row, "elem_bytes", 2)   # the reference kernels are 16-bit; CPU calibration may be fp32
        return attention_time(p, row.seqs, row.num_heads, row.num_kv_heads, row.head_dim, b, b, peak, bw)[0]
    return p.time(row.flops, row.nbytes, peak, bw)


def class_peak(gpu, cls):
    return gpu.peak_flops("fp8" if cls == "gemm_fp8" else "bf16")


def _fit_ops(g: pd.DataFrame, cls: str, gpu, naive: bool = False) -> OpParams:
    peak, bw = class_peak(gpu, cls), gpu.mem_bw
    attn = cls.startswith("attn")
    y = g["latency_us"].to_numpy() * 1e-6
    rows = list(g.itertuples())

    def resid(x):
        p = OpParams(x[0], x[1], x[2] * 1e-6, x[3] * 1e-6, x[4] if attn else 0.0, False, naive)
        return np.log(np.array([op_time(p, r, peak, bw) for r in rows]) / y)

    best = None
    starts = ([0.7, 0.8, 5, 5, 100], [0.6, 0.8, 10, 10, 300], [0.5, 0.5, 10, 10, 1000], [0.7, 0.9, 5, 5, 10])
    for x0 in starts:
        r = least_squares(resid, x0, loss=LOSS, f_scale=F_SCALE, bounds=([0.02, 0.02, 0, 0, 0], [1, 1, 1e4, 1e4, 1e5]))
        if best is None or r.cost < best.cost:
            best = r
    x = best.x
    return OpParams(float(x[0]), float(x[1]), float(x[2]) * 1e-6, float(x[3]) * 1e-6, float(x[4]) if attn else 0.0,
                    True, naive)


# --- collectives ----------------------------------------------------------------------------
def link_time(cls: str, protocols, nbytes: float, n: int, link_bw: float) -> float:
    return LinkParams(tuple(protocols)).time(cls, nbytes, n, link_bw)


def _fit_link(g: pd.DataFrame, cls: str, gpu) -> tuple:
    """Two protocols (alpha, eta, base) each, the faster serving each message (one protocol when there are
    fewer than 12 rows). send_recv has one hop, so its alpha and base are one parameter (base = 0)."""
    y = g["latency_us"].to_numpy() * 1e-6
    b, n, bw = g["nbytes"].to_numpy(), g["num_gpus"].to_numpy().astype(int), g["bw"].to_numpy()
    one_hop = cls.startswith("send_recv")

    def protos(x):
        return [(x[0] * 1e-6, x[1], 0.0 if one_hop else x[2] * 1e-6), (x[3] * 1e-6, x[4], 0.0 if one_hop else x[5] * 1e-6)]

    def resid(x):
        p = protos(x)
        return np.log(np.array([link_time(cls, p, bi, ni, wi) for bi, ni, wi in zip(b, n, bw)]) / y)

    # at least two rows per parameter: the second protocol (3 more parameters) needs 12 rows
    two = len(g) >= 12
    lo, hi = [0, 0.01, 0, 0, 0.01, 0], [1e3, 1.5, 1e3, 1e3, 1.5, 1e3]
    best = None
    for x0 in ([0.5, 0.3, 4, 2, 0.8, 20], [1, 0.2, 3, 5, 0.9, 40], [0.2, 0.4, 5, 1, 0.7, 10]):
        if two:
            r = least_squares(resid, x0, loss=LOSS, f_scale=F_SCALE, bounds=(lo, hi))
        else:
            r = least_squares(lambda x: resid(list(x) + list(x)), x0[3:], loss=LOSS, f_scale=F_SCALE, bounds=(lo[3:], hi[3:]))
            r.x = np.concatenate([r.x, r.x])
        if best is None or r.cost < best.cost:
            best = r
    p = sorted(protos(best.x), key=lambda q: q[2])
    return tuple(p if two else p[:1])


def _predict(cls, params, g, gpu) -> np.ndarray:
    if cls in LINK_CLASSES:
        return np.array([link_time(cls, params, r.nbytes, int(r.num_gpus), r.bw) for r in g.itertuples()])
    peak, bw = class_peak(gpu, cls), gpu.mem_bw
    return np.array([op_time(params, r, peak, bw) for r in g.itertuples()])


def _fit(cls, g, gpu):
    return _fit_link(g, cls, gpu) if cls in LINK_CLASSES else _fit_ops(g, cls, gpu)


def n_params(cls: str, rows: int) -> int:
    """Parameters a class's fit has: e, m, a, b (+ s0 for attention); links 3 per protocol, two protocols
    from 12 rows; send_recv's base folds into alpha."""
    if cls in LINK_CLASSES:
        per = 2 if cls.startswith("send_recv") else 3
        return per * (2 if rows >= 12 else 1)
    return 5 if cls.startswith("attn") else 4


def _entry(cls: str, params) -> dict:
    """The profile-file entry of fitted parameters (profile.op_params / link_params read it back)."""
    if cls in LINK_CLASSES:
        return {"protocols": [{"alpha_us": round(float(a) * 1e6, 4), "bw_efficiency": round(float(e), 4),
                               "base_us": round(float(c) * 1e6, 4)} for a, e, c in params]}
    entry = {"compute_efficiency": round(params.compute_efficiency, 4),
             "memory_efficiency": round(params.memory_efficiency, 4),
             "compute_offset_us": round(params.compute_offset_s * 1e6, 4),
             "memory_offset_us": round(params.memory_offset_s * 1e6, 4)}
    if cls.startswith("attn"):
        entry["seq_overhead"] = round(params.seq_overhead, 3)
    if params.naive:
        entry["naive_attention"] = True
    return entry


def _stack_rank(g: pd.DataFrame) -> int:
    repo = g["source_repo"].iloc[0]
    return STACK_PREFERENCE.index(repo) if repo in STACK_PREFERENCE else len(STACK_PREFERENCE)


def fit_reference(path: Path = KERNELS, loo: bool = True) -> dict:
    """Fit every (GPU, class, stack) group with at least two rows per parameter; returns the profile
    document (YAML-ready): per GPU and class the preferred stack's fit, the others under `other_stacks`."""
    rows = reference_rows(path)
    fits: dict = {}
    for (gname, cls, stack), g in rows[rows["cls"].notna()].groupby(["gpu_name", "cls", "stack"]):
        gpu = get_gpu(gname)
        if len(g) < 2 * n_params(cls, len(g)) or (cls in LINK_CLASSES and g["bw"].isna().any()):
            continue
        params = _fit(cls, g, gpu)
        y = g["latency_us"].to_numpy() * 1e-6
        ape = np.abs(_predict(cls, params, g, gpu) / y - 1)
        stats = {"stack": stack, "rows": int(len(g)), "median_ape_pct": round(100 * float(np.median(ape)), 2),
                 "p90_ape_pct": round(100 * float(np.percentile(ape, 90)), 2)}
        if loo:
            errs = []
            for k in range(len(g)):
                pk = _fit(cls, g.drop(g.index[k]), gpu)
                errs.append(abs(_predict(cls, pk, g.iloc[[k]], gpu)[0] / y[k] - 1))
            stats["loo_median_ape_pct"] = round(100 * float(np.median(errs)), 2)
            stats["loo_p90_ape_pct"] = round(100 * float(np.percentile(errs, 90)), 2)
        fits.setdefault((gname, cls), []).append((_stack_rank(g), -len(g), {**_entry(cls, params), **stats}))
    gpus: dict = {}
    for (gname, cls), found in fits.items():
        found.sort(key=lambda f: f[:2])
        entry = dict(found[0][2])
        if len(found) > 1:
            entry["other_stacks"] = {f[2]["stack"]: f[2] for f in found[1:]}
        gpus.setdefault(gname, {})[cls] = entry
    return {"source": "hwmodels/data/reference/kernel_points.csv (see its README for upstream commits)",
            "method": f"scipy least_squares ({LOSS}, scale {F_SCALE}) on log(predicted/measured) per GPU, op "
                      "class and software stack; stats: in-sample and leave-one-out absolute percentage errors",
            "created": dt.date.today().isoformat(), "gpus": gpus}


def write_profile(doc: dict, path: Path = PROFILES / "reference.yaml") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = ("# Fitted op-class parameters per GPU; written by `servesim calibrate --from-reference`.\n"
            "# Model: see hwmodels/profile.py. Do not edit by hand: re-run the fit.\n")
    path.write_text(head + yaml.safe_dump(doc, sort_keys=False, width=120))
    return path
