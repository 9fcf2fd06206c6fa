"""`servesim validate`: the same scenario run on a real transformer and on the roofline model, compared.

Run 1 (real): every replica group uses the measured backend (hwmodels/measured.py): each scheduled batch
executes, and the simulated clock advances by the measured wall time. Each step is also priced by the
roofline model, for the per-step comparison. Run 2 (sim): the same config, trace, seed, scheduler and
policies with `perf_model: roofline`, priced on the device profile `servesim calibrate` wrote for this
machine (measured once and cached in the profile folder; `--recalibrate` measures again).

Outputs in DIR: validate.json ({"metrics": {name: {"sim", "real", "rel_err"}}, "steps": per batch-shape
bucket errors, ...}), steps.csv (every step: shape, measured and predicted seconds), real/ and sim/ run
folders, validate_cdf.png (TTFT, TPOT and E2E CDFs of both runs).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from servesim.sim.config import RooflinePerf
from servesim.sim.errors import ConfigError

METRICS = {  # name -> (report section, key, sub-key)
    "ttft_p50": ("latency_ms", "ttft", "p50"), "ttft_p99": ("latency_ms", "ttft", "p99"),
    "tpot_p50": ("latency_ms", "tpot", "p50"), "tpot_p99": ("latency_ms", "tpot", "p99"),
    "e2e_p50": ("latency_ms", "e2e", "p50"), "e2e_p99": ("latency_ms", "e2e", "p99"),
    "output_tokens_per_s": ("throughput", "output_tokens_per_s", None),
}


def _metric(rep: dict, path) -> float:
    a, b, c = path
    v = rep[a][b]
    return float(v if c is None else v[c])


def ensure_profile(gpu: str, backend: str, device: str, recalibrate: bool) -> str:
    """The config's device must be a measured profile of this machine; calibrate it when missing."""
    from servesim.hwmodels.calibrate import calibrate
    from servesim.hwmodels.catalog import get_gpu
    try:
        if not recalibrate:
            get_gpu(gpu)
            return "cached"
    except ConfigError:
        if not gpu.startswith("local-"):
            raise ConfigError(f"gpu {gpu!r}: validate needs a device measured on this machine; name it "
                              f"local-{device}-{backend} (calibrated on first use) or run servesim calibrate") from None
    calibrate(backend, device, gpu, None)
    return "measured now"


def step_table(models) -> pd.DataFrame:
    rows = [(i, *r) for i, m in enumerate(models) for r in getattr(m, "log", [])]
    df = pd.DataFrame(rows, columns=["replica", "prefill_tokens", "decode_seqs", "context_tokens", "measured_s",
                                     "predicted_s"])
    df["kind"] = np.where(df["prefill_tokens"] == 0, "decode",
                          np.where(df["decode_seqs"] == 0, "prefill", "mixed"))
    tokens = df["prefill_tokens"] + df["decode_seqs"]
    df["tokens_bucket"] = pd.cut(tokens, [0, 8, 32, 128, 512, 2048, np.inf], right=True,
                                 labels=["1-8", "9-32", "33-128", "129-512", "513-2048", ">2048"]).astype(str)
    df["rel_err"] = df["predicted_s"] / df["measured_s"] - 1
    return df


def summarize_steps(df: pd.DataFrame) -> list[dict]:
    out = []
    for (kind, bucket), g in df.groupby(["kind", "tokens_bucket"]):
        out.append({"kind": kind, "tokens": bucket, "steps": int(len(g)),
                    "measured_ms_median": 1e3 * float(g["measured_s"].median()),
                    "predicted_ms_median": 1e3 * float(g["predicted_s"].median()),
                    "median_abs_rel_err": float(g["rel_err"].abs().median())})
    return out


def plot_cdfs(real_df: pd.DataFrame, sim_df: pd.DataFrame, out: Path, real_label: str = "real (measured)",
              sim_label: str = "sim (roofline)",
              title: str = "servesim validate: measured backend vs roofline on this machine's profile") -> Path:
    import matplotlib.pyplot as plt

    from servesim.sim.plots import cdf, save
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, col in zip(axes, ("ttft_s", "tpot_s", "e2e_s")):
        cdf(ax, real_df[col].to_numpy(dtype=float), real_label)
        cdf(ax, sim_df[col].to_numpy(dtype=float), sim_label, "--")
        ax.set_xlabel(f"{col[:-2].upper()} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, out / "validate_cdf.png", title)


def validate(cfg, base: Path | None, out: Path, recalibrate: bool = False) -> dict:
    from servesim.sim.report import request_table, write_outputs
    from servesim.sim.run import simulate

    groups = cfg.fleet.replicas
    for i, g in enumerate(groups):
        if g.perf_model.name != "measured":
            raise ConfigError(f"fleet.replicas[{i}].perf_model: validate needs the measured backend here "
                              f"(perf_model: {{name: measured, backend: numpy}}), got {g.perf_model.name}")
    profiles = {g.gpu: ensure_profile(g.gpu, g.perf_model.backend, g.perf_model.device, recalibrate) for g in groups}
    real = simulate(cfg, base, measured_reference=True)
    sim_cfg = cfg.model_copy(deep=True)
    for g in sim_cfg.fleet.replicas:
        g.perf_model = RooflinePerf()
    sim = simulate(sim_cfg, base)
    out.mkdir(parents=True, exist_ok=True)
    real_df, sim_df = request_table(real), request_table(sim)
    rep_real = write_outputs(real, out / "real", plots=False)
    rep_sim = write_outputs(sim, out / "sim", plots=False)
    metrics = {}
    for name, path in METRICS.items():
        r, s = _metric(rep_real, path), _metric(rep_sim, path)
        metrics[name] = {"sim": s, "real": r, "rel_err": s / r - 1 if r else None}
    steps = step_table(real.step_models)
    steps.to_csv(out / "steps.csv", index=False)
    doc = {"config": cfg.name, "seed": cfg.seed, "devices": profiles,
           "metrics": metrics,
           "steps": {"count": int(len(steps)),
                     "median_abs_rel_err": float(steps["rel_err"].abs().median()) if len(steps) else None,
                     "by_shape": summarize_steps(steps)},
           "real": {"wall_s": real.wall_s, "requests": rep_real["requests"]["finished"]},
           "sim": {"wall_s": sim.wall_s, "requests": rep_sim["requests"]["finished"]}}
    (out / "validate.json").write_text(json.dumps(doc, indent=2))
    doc["plot"] = str(plot_cdfs(real_df, sim_df, out))
    return doc


def format_table(doc: dict) -> str:
    lines = [f"{'metric':22s} {'real':>12s} {'sim':>12s} {'rel_err':>9s}"]
    for name, v in doc["metrics"].items():
        lines.append(f"{name:22s} {v['real']:12.3f} {v['sim']:12.3f} {100 * v['rel_err']:+8.1f}%")
    lines.append("")
    lines.append(f"{'steps by shape':22s} {'steps':>6s} {'measured ms':>12s} {'predicted ms':>13s} {'|err|':>7s}")
    for s in doc["steps"]["by_shape"]:
        lines.append(f"{s['kind'] + ' ' + s['tokens']:22s} {s['steps']:6d} {s['measured_ms_median']:12.2f} "
                     f"{s['predicted_ms_median']:13.2f} {100 * s['median_abs_rel_err']:6.1f}%")
    return "\n".join(lines)
