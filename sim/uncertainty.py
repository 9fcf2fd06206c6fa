"""The step-time model's error, propagated to the report, and combined with workload randomness.

R more runs of the same config and seed (so the same requests arrive at the same times), each with the roofline
op times of every (GPU, op class) multiplied by a factor drawn from that class's measured residuals
(hwmodels/model_error.py). A statistic's spread over those runs around the unperturbed run's value is the model's
share of the uncertainty: half-width t(R) x sqrt(mean((x_r - x)^2)), a normal prediction interval around the point
(the deviations, not the runs' mean, so a shift that every perturbed run shares widens it too). Workload
randomness (sectioning, sim/intervals.py) and model error are independent, so the combined half-width is the
root sum of squares of the two. The report keeps each: `<stat>_ci_workload`, `<stat>_ci_model`, and `<stat>_ci`
combined; SLO verdicts use the combined interval.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext

import numpy as np

from .intervals import LEVEL, t_quantile, verdict

STATS = ("mean", "p50", "p90", "p95", "p99")
LATENCY = ("ttft", "tpot", "itl", "e2e", "queue")
SALT = 0x6D6F64656C       # the model-error draws' own generator stream: the run's streams stay as they were


def slots(rep: dict):
    """(name, parent dict, key) of every statistic that gets an interval; the interval goes at key + '_ci'."""
    lat = rep["latency_ms"]
    for m in LATENCY:
        for s in STATS:
            yield f"latency_ms.{m}.{s}", lat[m], s
    yield "throughput.output_tokens_per_s", rep["throughput"], "output_tokens_per_s"
    yield "slo.attainment", rep["slo"], "attainment"
    for c, cl in rep["slo"]["classes"].items():
        yield f"slo.classes.{c}.attainment", cl, "attainment"


def values(rep: dict) -> dict:
    return {name: d[k] for name, d, k in slots(rep)}


def roofline_gpus(cfg) -> list[str]:
    """The GPUs whose replicas the roofline model prices (only those have residuals to perturb with)."""
    from servesim.hwmodels.catalog import get_gpu
    return sorted({get_gpu(g.gpu).name for g in cfg.fleet.replicas if g.perf_model.name == "roofline"})


def _one(args) -> dict:
    """One perturbed run's statistics (no intervals of its own)."""
    cfg, base, factors = args
    from .report import build_report
    from .run import simulate
    return values(build_report(simulate(cfg, base, step_error=factors)))


def model_half(point: float, xs, q: float) -> float:
    """The model's half-width at quantile q of t(R) (0.975: a two-sided 95% interval): t x the runs' root mean
    square deviation from the unperturbed value."""
    xs = np.asarray(xs, dtype=float)
    return float(t_quantile(len(xs), q) * np.sqrt(np.mean((xs - point) ** 2)))


def model_error_runs(cfg, base, runs: int, progress=None, workers: int | None = None) -> dict:
    """Run the perturbed replicates; what `apply` needs, with what they covered. workers: processes (default one
    per core; 1 inside a process that is itself a pool's worker)."""
    from servesim.hwmodels import model_error
    gpus = roofline_gpus(cfg)
    others = sorted({g.perf_model.name for g in cfg.fleet.replicas} - {"roofline"})
    info = {"runs": runs, "method": "per (GPU, op class) factors bootstrapped from the reference kernels' residuals "
            "(hwmodels/model_error.py), one draw per run", "sources": {g: model_error.sources(g) for g in gpus}}
    if others:
        info["not_covered_perf_models"] = others     # linear / measured replicas: no residuals to draw from
    if not gpus or runs == 0:
        info["runs"] = 0
        return {"info": info, "values": []}
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, SALT]))
    draws = [model_error.draw(gpus, rng) for _ in range(runs)]
    quiet = cfg.model_copy(update={"output": cfg.output.model_copy(update={"ci": False, "plots": False})})
    jobs = [(quiet, base, d) for d in draws]
    workers = min(runs, workers or os.cpu_count() or 1)
    pool = workers > 1 and not others    # forked workers; a measured backend (torch) stays in one process
    out = []
    with ProcessPoolExecutor(workers) if pool else nullcontext() as ex:
        for v in (ex.map if pool else map)(_one, jobs):
            out.append(v)
            if progress:
                progress(len(out), runs)
    info["factors"] = draws
    return {"info": info, "values": out}


def _half(ci, point) -> float:
    return max(point - ci[0], ci[1] - point)


def apply(rep: dict, runs: dict, level: float = LEVEL) -> None:
    """Adds model and combined intervals next to the workload ones (which become `_ci_workload`)."""
    vals = runs["values"]
    rep.setdefault("ci", {})["model_error"] = runs["info"]
    if not vals:
        return
    q = 0.5 + level / 2
    rep["ci"]["covers"] = "workload randomness and the step-time model's error (root sum of squares)"
    for name, d, k in slots(rep):
        point = d[k]
        wl = d.get(f"{k}_ci")
        d[f"{k}_ci_workload"] = wl
        xs = np.array([v[name] for v in vals if v.get(name) is not None], dtype=float)
        if point is None or len(xs) < 2:
            d[f"{k}_ci_model"] = None
            d[f"{k}_ci"] = wl
            continue
        hm = model_half(point, xs, q)
        share = name.endswith("attainment")
        d[f"{k}_ci_model"] = _clip([point - hm, point + hm], share)
        h = np.hypot(hm, _half(wl, point)) if wl is not None else hm
        d[f"{k}_ci"] = _clip([point - h, point + h], share)
    for cl in rep["slo"]["classes"].values():
        if "verdict" in cl:
            cl["verdict"] = verdict(cl["attainment_ci"], cl["attainment"], cl["attainment_target"])


def _clip(iv, share: bool):
    """Latencies and rates are non-negative; shares lie in [0, 1]."""
    return [max(float(iv[0]), 0.0), min(float(iv[1]), 1.0) if share else float(iv[1])]
