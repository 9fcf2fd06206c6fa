"""Where a run's time went: each step's seconds by what bounds them, each request's latency by phase.

Steps: the step-time model splits every iteration into ops bound by compute, ops bound by memory
bandwidth, collectives and CPU overhead; KV copies before a step (offload loads, swaps) are added by the
engine. Models that cannot split (linear, measured) leave their time as `other_s`. Summed per replica and
kind of step (pure decode, or with prompt tokens) in ReplicaStats.

Requests: every instant between arrival and finish is in exactly one part:
  queue      arrival -> first scheduled
  preemption from a preemption until the request's KV is back (re-queued, recomputed or swapped in)
  kv_load    loading its own cached prefix back from KV offload tiers (outside preemptions)
  kv_transfer sending its KV from its prefill replica to its decode replica (disaggregation)
  prefill    the rest of the time to the first token (its prompt steps, and waits between chunks)
  decode     the rest of the time after the first token
TTFT = queue + prefill + the preemption and kv_load before the first token; E2E adds decode, the KV
transfer and the preemptions after the first token.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .metrics import BLOCKERS, STEP_KINDS, TIME_PARTS
from .request import FINISHED

TTFT_PARTS = ("queue_s", "prefill_s", "preempted_ttft_s", "kv_load_s")
E2E_PARTS = ("queue_s", "prefill_s", "decode_s", "preempted_s", "kv_load_s", "kv_transfer_s")
PART_NAMES = {"queue_s": "queueing", "prefill_s": "prefill", "decode_s": "decode", "preempted_s": "preemption",
              "preempted_ttft_s": "preemption", "kv_load_s": "KV offload loads", "kv_transfer_s": "KV transfer"}


def add_request_parts(df: pd.DataFrame) -> pd.DataFrame:
    """The request table's phase columns (finished requests; NaN for the rest)."""
    fin = df["outcome"] == FINISHED
    df["prefill_s"] = (df["first_token_s"] - df["first_scheduled_s"] - df["preempted_ttft_s"]
                       - df["kv_load_s"]).where(fin)
    df["decode_s"] = (df["finish_s"] - df["first_token_s"] - (df["preempted_s"] - df["preempted_ttft_s"])
                      - df["kv_transfer_s"]).where(fin)
    for c in ("preempted_s", "preempted_ttft_s", "kv_load_s", "kv_transfer_s"):
        df[c] = df[c].where(fin)
    return df


def step_parts(stats, kinds=(0, 1)) -> dict:
    """Busy seconds of a replica (or several: a list) split by TIME_PARTS, plus other_s, over the given kinds."""
    stats = stats if isinstance(stats, list) else [stats]
    busy = sum(s.kind_s[k] for s in stats for k in kinds)
    out = {"busy_s": busy}
    for j, name in enumerate(TIME_PARTS):
        out[name] = sum(s.kind_parts[k][j] for s in stats for k in kinds)
    other = busy - sum(out[n] for n in TIME_PARTS)
    out["other_s"] = other if abs(other) > 1e-9 * busy else 0.0     # rounding of the sums is not a finding
    return out


def _steps_section(stats: list) -> dict:
    out = step_parts(stats)
    out["by_kind"] = {}
    for k, kind in enumerate(STEP_KINDS):
        n = sum(s.kind_steps[k] for s in stats)
        d = {"steps": n, **step_parts(stats, (k,)),
             "mean_batch": sum(s.kind_seqs[k] for s in stats) / n if n else None}
        out["by_kind"][kind] = d
    out["blocked_s"] = {b: sum(s.blocked_s[b] for s in stats) for b in BLOCKERS}
    return out


def _request_parts(df: pd.DataFrame, metric: str, parts: tuple, replica: str = "replica") -> dict:
    """Mean seconds of each part, and over the tail (requests at or above the metric's p99): the share of
    the tail's latency each part holds and the replica (column `replica`) holding most of the tail."""
    fin = df[df["outcome"] == FINISHED]
    fin = fin[fin["replica"] >= 0]               # answers from the response cache have no phases
    if fin.empty:
        return {}
    out = {"mean_ms": {PART_NAMES[p]: float(fin[p].mean() * 1000) for p in parts}}
    p99 = float(np.percentile(fin[metric], 99))
    tail = fin[fin[metric] >= p99]
    total = float(tail[metric].sum())
    shares = {PART_NAMES[p]: (float(tail[p].sum()) / total if total > 0 else 0.0) for p in parts}
    counts = tail[replica].value_counts()
    out["p99_ms"] = p99 * 1000
    out["p99_tail"] = {"requests": int(len(tail)), "share": shares,
                       "top_replica": int(counts.index[0]), "top_replica_share": float(counts.iloc[0] / len(tail))}
    return out


def attribution_report(result, df: pd.DataFrame) -> dict:
    stats = result.metrics.replicas
    engines = [g.engine for g in result.config.fleet.replicas for _ in range(g.count)]
    return {
        "steps": _steps_section(stats),
        "replicas": [{"index": i, "max_num_seqs": e.max_num_seqs, "max_num_batched_tokens": e.max_num_batched_tokens,
                      **_steps_section([s])} for i, (s, e) in enumerate(zip(stats, engines))],
        "requests": {"ttft": _request_parts(df.assign(first_replica=df["prefill_replica"].where(
                         df["prefill_replica"] >= 0, df["replica"])), "ttft_s", TTFT_PARTS, "first_replica"),
                     "e2e": _request_parts(df, "e2e_s", E2E_PARTS)},
    }
