"""Confidence intervals for a run's statistics from workload randomness, by sectioning (Asmussen & Glynn,
"Stochastic Simulation", 2007, III.5): the requests, in arrival order, are cut into K sections of equal count;
the statistic is computed on each, and the interval is the whole run's value +- t(K-1) x sd(sections) / sqrt(K).
It needs no extra runs; sections much longer than the system's memory (queue relaxation) make them nearly
independent, which long runs give. Short runs get wide intervals, as they should.

The step-time model's own error is propagated by perturbed runs and combined with these in sim/uncertainty.py.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

SECTIONS = 10
LEVEL = 0.95
MIN_PER_SECTION = 5       # fewer requests per section: no interval
T_TABLE = Path(__file__).parent / "data" / "t_quantiles.csv"


@lru_cache(maxsize=None)
def _t975() -> dict[int, float]:
    rows = np.loadtxt(T_TABLE, delimiter=",", comments="#", skiprows=5, ndmin=2)
    return {int(d): float(t) for d, t in rows}


def t_quantile(df: int, q: float) -> float:
    """The q quantile of Student's t with df degrees of freedom: from the table of 0.975 quantiles (df up to 200,
    scipy's own values) when it has it, else scipy.special.stdtrit, whose import costs a third of a second."""
    if q == 0.975 and df in _t975():
        return _t975()[df]
    from scipy import special
    return float(special.stdtrit(df, q))


def sections(n: int, k: int = SECTIONS) -> list[np.ndarray] | None:
    """Index arrays of k contiguous sections of n items of (nearly) equal count; None when too few."""
    if n < k * MIN_PER_SECTION:
        return None
    return np.array_split(np.arange(n), k)


def interval(point: float | None, per_section: list[float], level: float = LEVEL) -> list | None:
    """[low, high] around the whole run's value, from the spread of the sections' values."""
    vals = np.array([v for v in per_section if v is not None and v == v], dtype=float)
    if point is None or point != point or len(vals) < 2:
        return None
    half = t_quantile(len(vals) - 1, 0.5 + level / 2) * vals.std(ddof=1) / np.sqrt(len(vals))
    return [max(float(point - half), 0.0), float(point + half)]     # every statistic here is non-negative


def latency_intervals(online: pd.DataFrame, latency: dict, pcts, cols: dict) -> None:
    """Adds `<stat>_ci` next to each latency statistic (mean, pNN) of the report, in ms."""
    df = online.sort_values("arrival_s", kind="stable")
    parts = sections(len(df))
    if parts is None:
        return
    for name, col in cols.items():
        x = df[col].to_numpy(float)
        secs = [x[p][~np.isnan(x[p])] for p in parts]
        st = latency[name]
        st["mean_ci"] = interval(st["mean"], [s.mean() * 1000 if s.size else None for s in secs])
        for p in pcts:
            st[f"p{p}_ci"] = interval(st[f"p{p}"], [float(np.percentile(s, p)) * 1000 if s.size else None
                                                   for s in secs])


def histogram_intervals(h, st: dict, pcts) -> None:
    """`<stat>_ci` of a statistic kept only as a streaming histogram (ITL: one value per token), from its equal
    time sections (sim/metrics.py, 10 to 20 of them). Too few sections with enough values: no interval."""
    means = h.section_means(MIN_PER_SECTION)
    if len(means) < SECTIONS // 2:
        return
    st["mean_ci"] = interval(st["mean"], [m * 1000 for m in means])
    for p in pcts:
        st[f"p{p}_ci"] = interval(st[f"p{p}"], [q * 1000 for q in h.section_quantiles(p / 100, MIN_PER_SECTION)])


def rate_interval(point: float | None, times: np.ndarray, amounts: np.ndarray, start: float, end: float) -> list | None:
    """The interval of a rate (amount per second, e.g. output tokens finished): the run's span cut into K equal
    time sections, each section's rate, the run's rate +- t(K-1) x SE. Nothing when there are too few events."""
    if len(times) < SECTIONS * MIN_PER_SECTION or not end > start:
        return None
    edges = np.linspace(start, end, SECTIONS + 1)
    k = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, SECTIONS - 1)
    per = np.bincount(k, weights=amounts, minlength=SECTIONS) / np.diff(edges)
    return interval(point, per.tolist())


def share_interval(point: float | None, met: np.ndarray, level: float = LEVEL) -> list | None:
    """The interval of a share (SLO attainment) from its sections, clipped to [0, 1]."""
    parts = sections(len(met))
    if parts is None:
        return None
    iv = interval(point, [float(met[p].mean()) for p in parts], level)
    return None if iv is None else [max(iv[0], 0.0), min(iv[1], 1.0)]


def verdict(ci: list | None, point: float | None, target: float) -> str:
    """met / missed when the whole interval is on one side of the target (at least / below it); uncertain when
    it straddles it. Without an interval, the point decides."""
    if point is None:
        return "uncertain"
    lo, hi = ci if ci is not None else (point, point)
    if lo >= target:
        return "met"
    if hi < target:
        return "missed"
    return "uncertain"
