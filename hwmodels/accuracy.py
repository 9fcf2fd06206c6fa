"""Per-op accuracy of the step-time model against measured kernels (hwmodels/data/reference/).

Every row of kernel_points.csv is priced with the GPU's profile (fitted classes where the profile
has them, catalog defaults otherwise), through the same mapping the fit uses (fit.py); a row measured on
another software stack than the one the simulator uses is priced with that stack's fit, and the tables
say which stack each line is and whether the simulator uses it. Rows the
model cannot price (no fp4 peak, links between nodes) are counted as unsupported, never dropped.
The profile's leave-one-out errors (written by the fit) are shown beside the in-sample ones.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .catalog import get_gpu
from .fit import KERNELS, LINK_CLASSES, class_peak, op_time, reference_rows
from .memory import engine_constants
from .profile import _fitted, link_params, op_params, profile_for


def _stack_entry(fitted: dict, gpu: str, cls: str, stack: str) -> dict | None:
    """The fitted entry of (GPU, class) for a stack, if the profile has one."""
    f = fitted.get(gpu, {}).get(cls)
    if not f:
        return None
    return f if f.get("stack", stack) == stack else (f.get("other_stacks") or {}).get(stack)


def evaluate(path: Path = KERNELS) -> pd.DataFrame:
    df = reference_rows(path)
    alpha = engine_constants()["collective_latency_s"]
    profiles: dict = {}
    fitted = _fitted()
    pred, used = [], []
    for r in df.itertuples():
        if not isinstance(r.cls, str):
            pred.append(np.nan)
            used.append(False)
            continue
        gpu = get_gpu(r.gpu_name)
        prof = profiles.get(gpu.name) or profiles.setdefault(gpu.name, profile_for(gpu, alpha))
        f = _stack_entry(fitted, gpu.name, r.cls, r.stack)
        main = fitted.get(gpu.name, {}).get(r.cls) or {}
        used.append(f is None or f is main)
        if r.cls in LINK_CLASSES:
            link = link_params(f) if f else prof.link(r.cls)
            pred.append(link.time(r.cls, r.nbytes, int(r.num_gpus), r.bw) * 1e6)
        else:
            p = op_params(f) if f else prof.op(r.cls)
            pred.append(op_time(p, r, class_peak(gpu, r.cls), gpu.mem_bw) * 1e6)
    df["predicted_us"] = pred
    df["simulator_stack"] = used
    df["ape"] = (df["predicted_us"] - df["latency_us"]).abs() / df["latency_us"]
    df["log_ratio"] = np.log(df["predicted_us"] / df["latency_us"])
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """By GPU, op class and software stack: rows priced, median and p90 absolute percentage error, median
    bias, whether the simulator prices with this stack, whether it is fitted, and the fit's leave-one-out
    median error."""
    out, fitted = [], _fitted()
    for (gpu, cls, stack), g in df[df["cls"].notna()].groupby(["gpu_name", "cls", "stack"]):
        f = _stack_entry(fitted, gpu, cls, stack)
        out.append({"gpu": gpu, "op_class": cls, "stack": stack, "used": bool(g["simulator_stack"].iloc[0]),
                    "rows": len(g), "median_ape_%": 100 * g["ape"].median(), "p90_ape_%": 100 * g["ape"].quantile(0.9),
                    "median_pred/meas": float(np.exp(g["log_ratio"].median())),
                    "fitted": bool(f), "loo_median_ape_%": f.get("loo_median_ape_pct") if f else np.nan})
    return pd.DataFrame(out)


def plot(df: pd.DataFrame, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = df["predicted_us"].notna()
    fig, ax = plt.subplots(figsize=(7, 7))
    for cls, g in df[ok].groupby("cls"):
        ax.scatter(g["latency_us"], g["predicted_us"], s=10, label=cls)
    lo = df.loc[ok, ["latency_us", "predicted_us"]].min().min()
    hi = df.loc[ok, ["latency_us", "predicted_us"]].max().max()
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    for f in (0.9, 1.1):
        ax.plot([lo, hi], [lo * f, hi * f], "k:", lw=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured (us)")
    ax.set_ylabel("predicted (us)")
    ax.set_title("Step-time model vs measured kernels (dotted: +-10%)")
    ax.legend(fontsize=7, ncol=2)
    out.mkdir(parents=True, exist_ok=True)
    from servesim.sim.plots import save
    return save(fig, out / "accuracy_ops.png")


# --- end to end: published TensorRT-LLM tables (a check only, never fitting input) ------------
TRTLLM = KERNELS.parent / "trtllm_v061.csv"
TRT_MODELS = {"LLaMA 7B": "meta-llama/Llama-2-7b-hf", "LLaMA 70B": "meta-llama/Llama-2-70b-hf"}
TRT_GPUS = {"H100": "H100-SXM", "A100": "A100-80GB-SXM", "L40S": "L40S"}


def static_batch(model: str, gpu: str, tp: int, dtype: str, batch: int, input_len: int, output_len: int):
    """(seconds to first token, total seconds) of one static batch: one prefill of every prompt, then
    output_len - 1 decode steps of the whole batch (TensorRT-LLM's benchmark without in-flight batching)."""
    from .catalog import get_model
    from .roofline import RooflineModel
    from .step_time import BatchShape

    rm = RooflineModel(get_model(model), get_gpu(gpu), tp=tp, dtype=dtype, kv_dtype=dtype)
    first = rm.step_time(BatchShape([input_len] * batch, [0] * batch, [], batch)).seconds
    total = first
    for k in range(1, output_len):
        total += rm.step_time(BatchShape([], [], [input_len + k - 1] * batch, batch)).seconds
    return first, total


def engine_check(path: Path = TRTLLM) -> pd.DataFrame:
    df = pd.read_csv(path)
    pred, why = [], []
    for r in df.itertuples():
        model, gpu = TRT_MODELS.get(r.model), TRT_GPUS.get(r.gpu)
        if model is None or gpu is None:
            pred.append(np.nan)
            why.append(f"{r.model} not in the model catalog" if model is None else f"{r.gpu} not mapped")
            continue
        dtype = "fp8" if r.precision == "FP8" else "bf16"   # FP16 and BF16 have the same peaks and widths
        if r.table == "throughput":
            _, total = static_batch(model, gpu, int(r.tp), dtype, int(r.batch), int(r.input_len), int(r.output_len))
            pred.append(r.batch * r.output_len / total / r.tp)
        else:
            first, _ = static_batch(model, gpu, int(r.tp), dtype, 1, int(r.input_len), 1)
            pred.append(first * 1e3)
        why.append("")
    df["published"] = np.where(df["table"] == "throughput", df["tokens_per_s"], df["latency_ms"])
    df["predicted"] = pred
    df["why"] = why
    df["ape"] = (df["predicted"] - df["published"]).abs() / df["published"]
    return df


def plot_engine(e: pd.DataFrame, out: Path) -> Path:
    """Predicted vs published end-to-end numbers (log axes), one marker per table."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = e["predicted"].notna()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (table, unit) in zip(axes, (("throughput", "output tok/s per GPU"), ("first_token_latency", "ms"))):
        g = e[ok & (e["table"] == table)]
        for gpu, gg in g.groupby("gpu"):
            ax.scatter(gg["published"], gg["predicted"], s=18, label=gpu)
        lo, hi = g[["published", "predicted"]].min().min() * 0.8, g[["published", "predicted"]].max().max() * 1.2
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        for f in (0.85, 1.15):
            ax.plot([lo, hi], [lo * f, hi * f], "k:", lw=0.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"published ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
        ax.set_title(f"{table}: median error {100 * g['ape'].median():.1f}% ({len(g)} rows)")
        ax.legend(fontsize=8)
    from servesim.sim.plots import save
    return save(fig, out / "accuracy_engine.png",
                "servesim vs TensorRT-LLM v0.6.1 published tables (dotted: +-15%; never fitted)")
