"""Regression gate: compare a candidate's report(s) with a baseline's, metric by metric.

A side is one report.json, a run folder holding one, or a folder of run folders (one per seed).
Each compared metric has a direction (lower or higher is better) and a threshold in percent. With one
run per side a metric regresses when it worsens by more than its threshold. With several seeds per
side it regresses only when the mean worsens by more than the threshold *and* Welch's 95% confidence
interval of the difference excludes zero, so seed-to-seed noise does not trip the gate.
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from servesim.sim.errors import ConfigError

# metric pattern -> direction; patterns match dotted paths into report.json
DIRECTIONS = {
    "latency_ms.*": "lower", "throughput.*": "higher", "slo.attainment": "higher",
    "slo.goodput_requests_per_s": "higher", "cost.usd_per_1m_output_tokens": "lower",
    "cost.usd_per_request": "lower", "requests.finished": "higher", "requests.rejected": "lower",
    "requests.preemptions": "lower",
}
# every comparable metric of report.json, for validating threshold patterns
KNOWN = ([f"latency_ms.{m}.{s}" for m in ("ttft", "tpot", "itl", "e2e", "queue")
          for s in ("mean", "p50", "p90", "p95", "p99")]
         + [f"throughput.{m}" for m in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s")]
         + ["slo.attainment", "slo.goodput_requests_per_s", "cost.usd_per_1m_output_tokens", "cost.usd_per_request",
            "requests.finished", "requests.rejected", "requests.preemptions"])
DEFAULT_THRESHOLDS = {"latency_ms.ttft.p99": 5.0, "latency_ms.tpot.p99": 5.0, "latency_ms.e2e.p99": 5.0,
                      "throughput.*": 2.0, "slo.attainment": 2.0}


def group_reports(reports: list[dict], group: str, where: str) -> list[dict]:
    """The part of each report that one replica group served (a canary against the stable group), as a report
    holding what compares across groups of different sizes: latency percentiles and SLO attainment."""
    out = []
    for rep in reports:
        groups = rep.get("groups", {})
        if group not in groups:
            raise ConfigError(f"{where}: no replica group {group!r} in the report (groups: {', '.join(groups) or 'none'})")
        g = groups[group]
        out.append({"latency_ms": {"ttft": g["ttft_ms"], "tpot": g["tpot_ms"]},
                    "slo": {"attainment": g["slo_attainment"]}})
    return out


def load_side(path: Path) -> list[dict]:
    p = Path(path)
    if p.is_file():
        files = [p]
    elif (p / "report.json").is_file():
        files = [p / "report.json"]
    elif p.is_dir():
        files = sorted(p.glob("*/report.json"))
    else:
        raise ConfigError(f"{path}: no such report file or folder")
    if not files:
        raise ConfigError(f"{path}: no report.json in it or in its sub-folders")
    out = []
    for f in files:
        try:
            out.append(json.loads(f.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{f}: not a servesim report.json ({e})") from None
    return out


def flatten(report: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in report.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and math.isfinite(v):
            out[key] = float(v)
    return out


def _match(metric: str, table: dict):
    for pattern, value in table.items():
        if fnmatch.fnmatchcase(metric, pattern):
            return value
    return None


def load_thresholds(path: Path | None) -> dict[str, float]:
    if path is None:
        return dict(DEFAULT_THRESHOLDS)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"thresholds file {path}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in data.values()):
        raise ConfigError(f"thresholds file {path}: expected a mapping of metric pattern to a percentage >= 0, "
                          f"e.g. {{latency_ms.ttft.p99: 5, throughput.*: 2}}")
    unknown = [k for k in data if not any(fnmatch.fnmatchcase(m, k) for m in KNOWN)]
    if unknown:
        raise ConfigError(f"thresholds file {path}: no comparable metric matches {', '.join(unknown)} "
                          f"(comparable: {', '.join(KNOWN)})")
    return {**DEFAULT_THRESHOLDS, **{k: float(v) for k, v in data.items()}}


@dataclass
class Row:
    metric: str
    direction: str
    baseline: float
    candidate: float
    change_pct: float
    ci_pct: tuple | None
    threshold: float | None
    status: str


def compare(base: list[dict], cand: list[dict], thresholds: dict[str, float]) -> list[Row]:
    fb, fc = [flatten(r) for r in base], [flatten(r) for r in cand]
    metrics = sorted(set.intersection(*(set(f) for f in fb + fc)))
    rows = []
    for m in metrics:
        direction = _match(m, DIRECTIONS)
        if direction is None:
            continue
        b = np.array([f[m] for f in fb])
        c = np.array([f[m] for f in fc])
        bm, cm = b.mean(), c.mean()
        change = 100 * (cm - bm) / abs(bm) if bm else (0.0 if cm == bm else math.inf)
        worse = change if direction == "lower" else -change
        ci = None
        significant = True
        if len(b) > 1 and len(c) > 1 and bm:
            vb, vc = b.var(ddof=1) / len(b), c.var(ddof=1) / len(c)
            se = math.sqrt(vb + vc)
            if se > 0:
                dof = (vb + vc) ** 2 / (vb**2 / (len(b) - 1) + vc**2 / (len(c) - 1))
                half = stats.t.ppf(0.975, dof) * se
                ci = (100 * (cm - bm - half) / abs(bm), 100 * (cm - bm + half) / abs(bm))
                significant = not (ci[0] <= 0 <= ci[1])
            else:
                significant = cm != bm
        thr = _match(m, thresholds)
        if thr is None:
            status = "info"
        elif worse > thr and significant:
            status = "REGRESSED"
        elif -worse > thr and significant:
            status = "improved"
        else:
            status = "ok"
        rows.append(Row(m, direction, bm, cm, change, ci, thr, status))
    return rows


def format_table(rows: list[Row], n_base: int, n_cand: int) -> str:
    head = f"{'metric':34s} {'better':6s} {'baseline':>12s} {'candidate':>12s} {'change':>8s} {'95% CI':>17s} {'limit':>6s}  status"
    lines = [f"baseline: {n_base} run(s), candidate: {n_cand} run(s)", head, "-" * len(head)]
    for r in rows:
        ci = f"[{r.ci_pct[0]:+.1f}, {r.ci_pct[1]:+.1f}]" if r.ci_pct else ""
        thr = f"{r.threshold:g}%" if r.threshold is not None else ""
        lines.append(f"{r.metric:34s} {r.direction:6s} {r.baseline:12.4g} {r.candidate:12.4g} {r.change_pct:+7.1f}% "
                     f"{ci:>17s} {thr:>6s}  {r.status}")
    bad = [r.metric for r in rows if r.status == "REGRESSED"]
    lines.append(f"\n{len(bad)} regression(s)" + (": " + ", ".join(bad) if bad else ""))
    return "\n".join(lines)
