"""The step-time model's own error, as a distribution to propagate: per GPU and op class, the residuals
log(measured / predicted) of the reference kernels (hwmodels/data/reference/kernel_points.csv, the rows of the
software stack the simulator prices with; hwmodels/accuracy.py computes them), and for a device `servesim
calibrate` measured, those of the real backend's own kernels (kept in its profile as `log_residuals`).

A perturbed run draws one factor per (GPU, op class), exp(a residual picked at random from that class's
residuals), and multiplies every op of that class by it for the whole run. One draw per run, not per step:
a kernel that the model under-prices is under-priced on every step (a systematic error), and per-step noise
would average away and understate the effect on latency. The residuals are in-sample (the profile was fitted
to these rows), so they understate the error on shapes the fit never saw; the fits' leave-one-out errors
(`servesim accuracy`) are typically a few points higher. Classes a GPU has no rows for borrow the residuals
of the same class on every other GPU (`pooled`); classes no GPU has rows for are not perturbed and are
reported as such (`not_covered`). The CPU's per-step overhead is not perturbed.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .catalog import profile_dirs
from .profile import LINK_CLASSES, OP_CLASSES, _fitted


def _residuals() -> dict:
    return _residuals_in(tuple(profile_dirs()))


@lru_cache(maxsize=None)
def _residuals_in(dirs: tuple) -> dict:
    """{(gpu, class): log(measured / predicted) array} over the simulator's stack, and {class: pooled array}."""
    from .accuracy import evaluate
    df = evaluate()
    df = df[df["simulator_stack"] & df["cls"].notna() & np.isfinite(df["log_ratio"])]
    by = {k: -g["log_ratio"].to_numpy(float) for k, g in df.groupby(["gpu_name", "cls"])}
    pooled = {c: -g["log_ratio"].to_numpy(float) for c, g in df.groupby("cls")}
    for dev, classes in _fitted().items():     # devices `servesim calibrate` measured: the real backend's kernels
        for c, f in classes.items():
            if f.get("log_residuals"):
                by[(dev, c)] = np.asarray(f["log_residuals"], dtype=float)
    return {"by": by, "pooled": pooled}


def sources(gpu: str) -> dict:
    """Where each class's residuals come from for this GPU: {class: 'N rows' | 'pooled (N rows)'} and the
    classes without any ('not_covered')."""
    from .catalog import get_gpu
    from .profile import profile_for
    r = _residuals()
    out, missing = {}, []
    separate_gemv = profile_for(get_gpu(gpu), 0.0).op("gemv").fitted
    for c in OP_CLASSES + LINK_CLASSES:
        if c == "gemv" and not separate_gemv:
            out[c] = "priced as gemm"
        elif (gpu, c) in r["by"]:
            out[c] = f"{len(r['by'][(gpu, c)])} rows"
        elif c in r["pooled"]:
            out[c] = f"pooled ({len(r['pooled'][c])} rows, other GPUs)"
        else:
            missing.append(c)
    return {"classes": out, "not_covered": missing}


def draw(gpus, rng: np.random.Generator) -> dict:
    """One run's factors: {gpu: {class: factor}} (times the model's op time), one bootstrap residual each.
    Classes and GPUs are drawn in a fixed order so the same generator gives the same factors."""
    r = _residuals()
    out = {}
    for gpu in sorted(set(gpus)):
        f = {}
        for c in OP_CLASSES + LINK_CLASSES:
            res = r["by"].get((gpu, c))
            if res is None:
                res = r["pooled"].get(c)
            if res is not None:
                f[c] = float(np.exp(res[rng.integers(len(res))]))
        out[gpu] = f
    return out
