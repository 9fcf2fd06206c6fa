"""Per-op accuracy of the step-time primitives against measured kernels (hwmodels/data/reference/).

Every row of kernel_points.csv is priced with the same primitives the simulator uses (ops.py) and
the GPU's catalog efficiencies; rows the model cannot price (no fp4 peak, links between nodes)
are counted as `unsupported`, never dropped silently. Published numbers are used only as a check.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from .catalog import DATA, get_gpu
from .memory import engine_constants
from .ops import attention, gemm, ring_all_gather_time, ring_all_reduce_time, roofline_time, send_recv_time

KERNELS = DATA / "reference" / "kernel_points.csv"
GPU_NAMES = {"A100-80GB": "A100-80GB-SXM"}   # Vidur names the A100-80GB without its form factor
VIDUR_GEMMS = {"attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj"}


def _note(notes: str, key: str) -> float | None:
    m = re.search(rf"{key}=(\d+)", notes or "")
    return float(m.group(1)) if m else None


def predict_us(row) -> tuple[float | None, str]:
    """Predicted latency of one reference row in microseconds, or (None, why not)."""
    gpu = get_gpu(GPU_NAMES.get(row.gpu, row.gpu))
    alpha = engine_constants()["collective_latency_s"]
    op, notes = row.op, row.notes if isinstance(row.notes, str) else ""
    if op == "gemm" or op in VIDUR_GEMMS:
        if row.dtype == "nvfp4":
            return None, "no fp4 peak in the GPU catalog"
        if row.dtype == "fp8":
            f, b = gemm(row.m, row.n, row.k, 1, 1, 2)
            return roofline_time(gpu, f, b, "fp8") * 1e6, ""
        f, b = gemm(row.m, row.n, row.k)
        return roofline_time(gpu, f, b) * 1e6, ""
    if op in ("prefill_attention", "decode_attention"):
        new, cached = (row.seq_len, 0) if op == "prefill_attention" else (1, row.seq_len - 1)
        f, b = attention(new, cached, row.num_heads, row.num_kv_heads, row.head_dim)
        return roofline_time(gpu, row.batch * f, row.batch * b) * 1e6, ""
    if op in ("allreduce", "allreduce_custom", "allgather", "send_recv"):
        per_node = _note(notes, "devices_per_node")
        nodes = _note(notes, "nodes")
        if (nodes or 1) > 1 and (per_node or 1) < row.num_gpus:
            return None, "crosses nodes: no inter-node link in the GPU catalog"
        if not gpu.link_bw:
            return None, "no intra-node link bandwidth in the GPU catalog"
        n = int(row.num_gpus)
        if op == "allgather":
            return ring_all_gather_time(row.bytes, n, gpu.link_bw, alpha) * 1e6, ""
        if op == "send_recv":
            return send_recv_time(row.bytes, gpu.link_bw, alpha) * 1e6, ""
        return ring_all_reduce_time(row.bytes, n, gpu.link_bw, alpha) * 1e6, ""
    h, inter = _note(notes, "hidden"), _note(notes, "intermediate")
    T, tp = row.num_tokens, row.tp if row.tp == row.tp else 1
    elementwise = {
        "input_layernorm": lambda: 2 * T * h * 2,                                  # read + write
        "add": lambda: 3 * T * h * 2,                                              # two inputs, one output
        "attn_rope": lambda: 2 * T * (row.num_heads + row.num_kv_heads) * row.head_dim / tp * 2,
        "mlp_act": lambda: T * 3 * inter / tp * 2,                                 # gate, up in; out
    }
    if op in elementwise and h:
        return roofline_time(gpu, 0.0, elementwise[op]()) * 1e6, ""
    return None, f"op {op} is not priced"


def evaluate(path: Path = KERNELS) -> pd.DataFrame:
    df = pd.read_csv(path)
    pred, why = zip(*(predict_us(r) for r in df.itertuples()))
    df["predicted_us"] = np.array([np.nan if p is None else p for p in pred], dtype=float)
    df["unsupported"] = list(why)
    df["ape"] = (df["predicted_us"] - df["latency_us"]).abs() / df["latency_us"]
    df["log_ratio"] = np.log(df["predicted_us"] / df["latency_us"])
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """By GPU and op: rows, rows priced, median and p90 absolute percentage error, median bias."""
    def agg(g):
        ok = g["predicted_us"].notna()
        return pd.Series({"rows": len(g), "priced": int(ok.sum()),
                          "median_ape_%": 100 * g.loc[ok, "ape"].median() if ok.any() else np.nan,
                          "p90_ape_%": 100 * g.loc[ok, "ape"].quantile(0.9) if ok.any() else np.nan,
                          "median_pred/meas": float(np.exp(g.loc[ok, "log_ratio"].median())) if ok.any() else np.nan})
    return df.groupby(["gpu", "op", "dtype"]).apply(agg, include_groups=False).reset_index()


def plot(df: pd.DataFrame, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = df["predicted_us"].notna()
    fig, ax = plt.subplots(figsize=(7, 7))
    for op, g in df[ok].groupby("op"):
        ax.scatter(g["latency_us"], g["predicted_us"], s=10, label=op)
    lo, hi = df.loc[ok, ["latency_us", "predicted_us"]].min().min(), df.loc[ok, ["latency_us", "predicted_us"]].max().max()
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    for f in (0.9, 1.1):
        ax.plot([lo, hi], [lo * f, hi * f], "k:", lw=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured (us)")
    ax.set_ylabel("predicted (us)")
    ax.set_title("Roofline primitives vs measured kernels (kernel_points.csv)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    p = out / "accuracy_ops.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
