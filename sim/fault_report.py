"""The report's `faults` section: what failed, what was retried, availability, and SLO attainment before,
during and after each fault."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .request import FAILED, FINISHED

AROUND_S = 300.0        # before and after a fault: the windows SLO attainment is compared over
WINDOW_S = 30.0         # recovery is judged on windows of this many seconds (by arrival)
RECOVERY_HORIZON_S = 600.0


def down_intervals(result, end: float) -> dict:
    """replica -> [(down, up)] from the injector's up/down changes (up = end while still down)."""
    out: dict = {}
    if result.faults is None:
        return out
    since = {}
    for t, i, up in result.faults.up_changes:
        if not up:
            since[i] = t
        elif i in since:
            out.setdefault(i, []).append((since.pop(i), t))
    for i, t in since.items():
        out.setdefault(i, []).append((t, end))
    return out


def _attainment(arrival: np.ndarray, met: np.ndarray, lo: float, hi: float):
    return _share(met, (arrival >= lo) & (arrival < hi))


def _share(met: np.ndarray, sel: np.ndarray):
    return float(met[sel].mean()) if sel.any() else None


def faults_report(result, attempts: pd.DataFrame, df: pd.DataFrame, met: pd.Series) -> dict:
    start = float(df["arrival_s"].min()) if len(df) else 0.0
    end = result.sim_end
    duration = max(end - start, 1e-12)
    n = len(result.replicas)
    down = down_intervals(result, end)
    down_s = sum(min(b, end) - a for iv in down.values() for a, b in iv)
    fin = df["outcome"] == FINISHED
    retried = df["attempt"] > 0
    failed_attempts = attempts[attempts["outcome"] == FAILED]
    online = df[df["job"] == ""]
    arr, ok = online["arrival_s"].to_numpy(float), met[online.index].to_numpy(bool)
    ended = online["finish_s"].fillna(np.inf).to_numpy(float)
    events = []
    for e in (result.faults.events if result.faults is not None else []):
        t, until = e["t"], e.get("until", e["t"])
        # before: arrived in the AROUND_S before and done by the fault; during: in the system at the fault or
        # arriving until it ends; after: arriving in the AROUND_S after it ends
        before = _share(ok, (arr >= max(t - AROUND_S, 0.0)) & (ended < t))
        during = _share(ok, (arr < max(until, t)) & (ended >= t)) if until > t or e["kind"] in ("crash", "node_loss") \
            else None
        rec = None
        if before is not None:
            rec = 0.0
            for w in np.arange(t, until + RECOVERY_HORIZON_S, WINDOW_S):
                a = _attainment(arr, ok, w, w + WINDOW_S)
                if a is not None and a < before - 0.01:
                    rec = float(w + WINDOW_S - t)
        events.append({**e, "slo_before": before, "slo_during": during,
                       "slo_after": _attainment(arr, ok, until, until + AROUND_S),
                       "slo_recovered_s": rec})
    return {
        "events": events,
        "availability": {"replica_uptime": 1.0 - down_s / (n * duration),
                         "requests_finished": float(fin.mean()) if len(df) else None},
        "requests": {"total": int(len(df)), "finished": int(fin.sum()), "failed": int((df["outcome"] == FAILED).sum()),
                     "retried": int(retried.sum()), "succeeded_after_retry": int((retried & fin).sum()),
                     "attempts": int(len(attempts)),
                     "failed_attempts_by_reason": {str(k): int(v) for k, v in
                                                   failed_attempts["reason"].value_counts().sort_index().items()},
                     "wasted_output_tokens": int(failed_attempts["generated_tokens"].sum())},
        "kv_blocks_lost": int(sum(s.kv_blocks_lost for s in result.metrics.replicas)),
        "downtime_s": {str(i): float(sum(min(b, end) - a for a, b in iv)) for i, iv in sorted(down.items())},
    }
