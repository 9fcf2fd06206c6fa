"""Anomalies found in every run: the patterns a serving team looks for when a tail is worse than expected.

- priority inversion: a request waited while a less important one that arrived after it was started first
  on the same replica (importance: `slo.classes.<c>.priority`, else the priority policy's map; lower first);
- head-of-line blocking: a replica whose mean queue is far above the rest of the fleet's;
- preemption storm: at least STORM_MIN preemptions on one replica within STORM_WINDOW_S;
- KV thrashing: many evicted prefix blocks needed again within REFETCH_WINDOW_S (sim/kv_cache.py);
- tenant starvation: a tenant whose requests wait far longer, or finish far less, than the others'.
Fairness across tenants and SLO classes is Jain's index (Jain, Chiu and Hawe, DEC-TR-301, 1984):
(sum x)^2 / (n sum x^2), 1 when all are equal, 1/n when one gets everything.
The thresholds are module constants: a finding is a prompt to look, not a verdict.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .kv_cache import REFETCH_WINDOW_S
from .request import FINISHED

HOL_FACTOR, HOL_MIN_QUEUE = 4.0, 2.0   # mean queue > 4x the other replicas' mean, and at least 2 requests
STORM_WINDOW_S, STORM_MIN = 1.0, 10
THRASH_MIN, THRASH_SHARE = 100, 0.25   # refetched blocks, and their share of evictions
STARVE_FACTOR, STARVE_MIN_S = 10.0, 1.0  # median queue 10x the other tenants', and at least 1 s
STARVE_FINISHED = 0.5                  # or under half its requests finished while the others finish 90%+


def priorities(cfg) -> dict | None:
    """SLO class -> priority (lower is more important), or None when the run states no importance."""
    own = {n: c.priority for n, c in cfg.slo.classes.items() if c.priority is not None}
    if own:
        return {n: own.get(n, 0) for n in cfg.slo.classes}
    b = cfg.policies.batching
    if getattr(b, "name", "") == "priority" and b.priorities:
        return {n: b.priorities.get(n, 0) for n in cfg.slo.classes}
    return None


def _range_min(values: np.ndarray):
    """Sparse table for min over values[lo:hi] (hi > lo), queried with arrays."""
    table = [values]
    k = 1
    while 2 * k <= len(values):
        prev = table[-1]
        table.append(np.minimum(prev[:-k], prev[k:]))
        k *= 2

    def query(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        out = np.full(len(lo), np.inf)
        ok = hi > lo
        lev = np.zeros(len(lo), dtype=np.int64)
        lev[ok] = np.floor(np.log2(hi[ok] - lo[ok])).astype(np.int64)
        for j in np.unique(lev[ok]):
            sel = ok & (lev == j)
            t = table[j]
            out[sel] = np.minimum(t[lo[sel]], t[hi[sel] - (1 << int(j))])
        return out
    return query


def priority_inversions(df: pd.DataFrame, prio: dict | None, sim_end: float) -> dict:
    """Requests A for which some request B on A's replica, less important, arrived after A and before A
    started, and started before A."""
    if prio is None:
        return {"checked": False, "count": 0, "requests": []}
    d = df[df["replica"] >= 0]
    inverted = []
    for _, g in d.groupby("replica"):
        p = g["slo_class"].map(prio).fillna(0).to_numpy()
        arr = g["arrival_s"].to_numpy(float)
        fs = g["first_scheduled_s"].fillna(sim_end).to_numpy(float)
        ids = g["id"].to_numpy()
        for level in np.unique(p):
            a = p == level
            b = (p > level) & (g["first_scheduled_s"].notna().to_numpy())
            if not a.any() or not b.any():
                continue
            order = np.argsort(arr[b], kind="stable")
            arr_b, fs_b = arr[b][order], fs[b][order]
            lo = np.searchsorted(arr_b, arr[a], side="right")     # arrived strictly after A
            hi = np.searchsorted(arr_b, fs[a], side="left")       # ... and before A started
            first = _range_min(fs_b)(lo, hi)
            inverted.extend(ids[a][first < fs[a]].tolist())
    inverted.sort()
    return {"checked": True, "count": len(inverted), "requests": inverted[:20]}


def hol_blocking(df: pd.DataFrame, num_replicas: int, duration: float) -> list:
    """Replicas whose mean number of queued requests (Little's law: queueing seconds / duration) is far above
    the mean of the other replicas."""
    if num_replicas < 2:
        return []
    q = np.zeros(num_replicas)
    d = df[(df["replica"] >= 0) & df["first_scheduled_s"].notna()]
    np.add.at(q, d["replica"].to_numpy(int), (d["first_scheduled_s"] - d["arrival_s"]).to_numpy(float))
    q /= duration
    out = []
    for i in range(num_replicas):
        others = (q.sum() - q[i]) / (num_replicas - 1)
        if q[i] >= HOL_MIN_QUEUE and q[i] > HOL_FACTOR * others:
            out.append({"replica": i, "mean_queue": float(q[i]), "others_mean_queue": float(others)})
    return out


def preemption_storms(stats: list) -> list:
    """Episodes of at least STORM_MIN preemptions within STORM_WINDOW_S on one replica (overlapping windows
    merged)."""
    out = []
    for i, s in enumerate(stats):
        t = np.asarray(s.preempt_times, float)
        if len(t) < STORM_MIN:
            continue
        end = np.searchsorted(t, t + STORM_WINDOW_S, side="left")   # preemptions in [t_j, t_j + window)
        start = None
        for j in np.flatnonzero(end - np.arange(len(t)) >= STORM_MIN).tolist():
            lo, hi = j, int(end[j]) - 1
            if start is not None and lo <= last:
                last = max(last, hi)
                continue
            if start is not None:
                out.append(_storm(i, t, start, last))
            start, last = lo, hi
        if start is not None:
            out.append(_storm(i, t, start, last))
    return out


def _storm(replica: int, t: np.ndarray, lo: int, hi: int) -> dict:
    return {"replica": replica, "start_s": float(t[lo]), "end_s": float(t[hi]), "preemptions": hi - lo + 1}


def kv_thrashing(pools: list) -> list:
    out = []
    for i, pool in enumerate(pools):
        if pool.refetched >= THRASH_MIN and pool.refetched >= THRASH_SHARE * pool.evictions:
            out.append({"replica": i, "refetched_blocks": pool.refetched, "evicted_blocks": pool.evictions})
    return out


def starvation(df: pd.DataFrame) -> list:
    tenants = sorted(df["tenant"].unique())
    if len(tenants) < 2:
        return []
    out = []
    for t in tenants:
        mine, rest = df[df["tenant"] == t], df[df["tenant"] != t]
        q_mine, q_rest = mine["queue_s"].median(), rest["queue_s"].median()
        fin_mine = (mine["outcome"] == FINISHED).mean()
        fin_rest = (rest["outcome"] == FINISHED).mean()
        slow = (q_mine == q_mine and q_rest == q_rest and q_mine >= STARVE_MIN_S and q_mine > STARVE_FACTOR * q_rest)
        unserved = fin_mine < STARVE_FINISHED and fin_rest >= 0.9
        if slow or unserved:
            out.append({"tenant": t, "median_queue_s": _num(q_mine), "others_median_queue_s": _num(q_rest),
                        "finished_share": float(fin_mine), "others_finished_share": float(fin_rest)})
    return out


def _num(v) -> float | None:
    return None if v != v else float(v)


def jain(x) -> float | None:
    x = np.asarray([v for v in x if v is not None and not math.isnan(v)], float)
    if len(x) < 2 or not (x ** 2).sum():
        return None
    return float(x.sum() ** 2 / (len(x) * (x ** 2).sum()))


def fairness(df: pd.DataFrame, met: pd.Series) -> dict:
    """Jain's index over tenants of SLO attainment and of the share of requested output tokens delivered;
    over SLO classes of attainment."""
    fin = df["outcome"] == FINISHED
    by_t = df.assign(met=met, got=df["output_tokens"].where(fin, 0)).groupby("tenant")
    by_c = df.assign(met=met).groupby("slo_class")
    return {"tenants": {"slo_attainment": jain(by_t["met"].mean()),
                        "tokens_delivered": jain(by_t["got"].sum() / by_t["output_tokens"].sum())},
            "slo_classes": {"slo_attainment": jain(by_c["met"].mean())}}


def find_anomalies(result, df: pd.DataFrame, met: pd.Series, duration: float) -> dict:
    out = {"priority_inversions": priority_inversions(df, priorities(result.config), result.sim_end),
           "hol_blocking": hol_blocking(df, len(result.replicas), duration),
           "preemption_storms": preemption_storms(result.metrics.replicas),
           "kv_thrashing": kv_thrashing(result.pools),
           "starvation": starvation(df),
           "fairness": fairness(df, met)}
    found = []
    pi = out["priority_inversions"]
    if pi["count"]:
        found.append(f"{pi['count']} priority inversion(s): requests {pi['requests'][:5]} waited while a less "
                     "important later arrival started first")
    for h in out["hol_blocking"]:
        found.append(f"head-of-line blocking on replica {h['replica']}: {h['mean_queue']:.1f} requests queued on "
                     f"average vs {h['others_mean_queue']:.1f} elsewhere")
    for s in out["preemption_storms"]:
        found.append(f"preemption storm on replica {s['replica']}: {s['preemptions']} preemptions in "
                     f"{s['start_s']:.2f}-{s['end_s']:.2f} s")
    for k in out["kv_thrashing"]:
        found.append(f"KV thrashing on replica {k['replica']}: {k['refetched_blocks']} of {k['evicted_blocks']} "
                     f"evicted blocks were needed again within {REFETCH_WINDOW_S:g} s")
    for s in out["starvation"]:
        found.append(f"tenant {s['tenant']} starved: median queue {s['median_queue_s']} s vs "
                     f"{s['others_median_queue_s']} s, {100 * s['finished_share']:.0f}% finished")
    out["found"] = found
    return out
