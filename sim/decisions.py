"""Decision tracing (`servesim run --trace-level decisions`) and the routing regret it makes possible.

Every routing, admission, preemption and eviction decision is recorded with what the policy chose between:
routing with each replica's state as routers score it (outstanding, waiting, running, free KV fraction,
cached prefix tokens); admission with its verdict; preemption with the running requests it kept;
eviction with the evicted block's sort key and how many cached blocks were candidates.

Regret of a routing decision: the run is simulated again from the start with that one decision changed to
each of the top-k alternatives (the least loaded other replicas), up to a look-ahead horizon, and each
variant is scored by the mean latency of the requests arriving in the look-ahead window (censored at the
horizon). Regret = the chosen variant's score minus the best alternative's, floored at 0. Everything else
stays as it was (same seed, same arrivals), so the difference is that decision's.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np


class DecisionLog:
    def __init__(self):
        self.rows: list[dict] = []
        self.routes: list[int] = []          # row index of each routing decision, in order
        self.evictions: list[tuple] = []

    def route(self, req, replicas, chosen: int, now: float) -> None:
        cands = [{"replica": r.index, "outstanding": r.outstanding, "waiting": r.num_waiting,
                  "running": r.num_running, "kv_free": round(r.kv_free_fraction, 6),
                  "cached_prefix_tokens": r.cached_prefix_tokens(req) if r.pool.caching else 0} for r in replicas]
        self.routes.append(len(self.rows))
        self.rows.append({"t": now, "kind": "route", "request": req.id, "chosen": chosen, "candidates": cands})

    def admit(self, req, reason, now: float) -> None:
        self.rows.append({"t": now, "kind": "admission", "request": req.id, "admitted": not reason,
                          "reason": reason or ""})

    def preempt(self, replica, req) -> None:
        self.rows.append({"t": replica.env.now, "kind": "preemption", "replica": replica.index, "request": req.id,
                          "lost_tokens": req.num_computed, "swapped": bool(req.swapped_tokens),
                          "others_running": [r.id for r in replica.running if r is not req][:64]})

    def evict(self, replica: int, pool, block_hash, key) -> None:
        # the most frequent decision by far (every reuse of a cached-free block): a tuple until written
        self.evictions.append((pool.now, replica, block_hash, key, pool.num_cached_free + 1))

    def counts(self) -> dict:
        out = {"route": 0, "admission": 0, "preemption": 0, "eviction": len(self.evictions)}
        for r in self.rows:
            out[r["kind"]] += 1
        return out

    def write(self, path: Path) -> None:
        """JSON lines, gzip-compressed (decisions.jsonl.gz), in time order (evictions after the other decisions
        of their instant)."""
        rows = self.rows + [{"t": t, "kind": "eviction", "replica": i, "block": str(h), "key": _plain(k),
                             "candidates": n} for t, i, h, k, n in self.evictions]
        rows.sort(key=lambda r: r["t"])                   # stable: each kind keeps its order
        with gzip.open(path, "wt", compresslevel=1) as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def _plain(key):
    """An eviction key (numbers, tuples of them) as JSON."""
    if isinstance(key, tuple):
        return [_plain(k) for k in key]
    return key if isinstance(key, (int, float, str)) or key is None else str(key)


class ForcedRouter:
    """The run's router with decision number `index` (0-based, in routing order) replaced by `replica`. The
    router still decides (its state and random draws advance as in the original run)."""

    def __init__(self, base, index: int, replica: int):
        self.base, self.index, self.replica, self.n = base, index, replica, 0
        self.reads_kv_state = getattr(base, "reads_kv_state", True)

    def route(self, request, replicas, now):
        i = self.base.route(request, replicas, now)
        if self.n == self.index:                      # routers return positions in the list they were given
            i = next((j for j, r in enumerate(replicas) if r.index == self.replica), i)
        self.n += 1
        return i


def window_cost(requests, t0: float, window: float, horizon: float) -> float:
    """Mean latency of the requests that arrived in [t0, t0 + window], each finished one at its finish and
    any other at the horizon (rejected ones count what they waited: 0). Online requests only: routers place
    those; batch jobs wait for room by design (sim/batch_jobs.py)."""
    lat = [(min(r.finish, horizon) if r.finish == r.finish else horizon) - r.arrival
           for r in requests if t0 <= r.arrival <= t0 + window and r.job < 0]
    return float(np.mean(lat)) if lat else 0.0


def routing_regret(cfg, base_dir, log: DecisionLog, samples: int = 20, top_k: int = 2,
                   lookahead_s: float = 30.0) -> dict:
    """Regret of `samples` routing decisions spread evenly over the run (see the module docstring)."""
    from .run import simulate
    n = len(log.routes)
    if n == 0 or samples <= 0:
        return {"samples": 0}
    picks = sorted(set(np.linspace(0, n - 1, min(samples, n)).round().astype(int).tolist()))
    rows = []
    for d in picks:
        dec = log.rows[log.routes[d]]
        t0 = dec["t"]
        horizon = t0 + 2 * lookahead_s
        alts = sorted((c for c in dec["candidates"] if c["replica"] != dec["chosen"]),
                      key=lambda c: (c["outstanding"], c["replica"]))[:top_k]
        if not alts:
            continue
        cost = {}
        for rep in [dec["chosen"]] + [c["replica"] for c in alts]:
            res = simulate(cfg, base_dir, route_override=(d, rep), until=horizon)
            cost[rep] = window_cost(res.metrics.requests, t0, lookahead_s, horizon)
        best = min((c["replica"] for c in alts), key=lambda r: (cost[r], r))
        rows.append({"decision": d, "t": t0, "request": dec["request"], "chosen": dec["chosen"],
                     "chosen_cost_s": cost[dec["chosen"]], "best_alternative": best,
                     "best_alternative_cost_s": cost[best],
                     "regret_s": max(0.0, cost[dec["chosen"]] - cost[best])})
    reg = np.array([r["regret_s"] for r in rows]) if rows else np.zeros(0)
    return {"samples": len(rows), "top_k": top_k, "lookahead_s": lookahead_s,
            "mean_regret_s": float(reg.mean()) if len(reg) else 0.0,
            "max_regret_s": float(reg.max()) if len(reg) else 0.0,
            "share_suboptimal": float((reg > 0).mean()) if len(reg) else 0.0,
            "decisions": sorted(rows, key=lambda r: -r["regret_s"])}


def decisions_report(log: DecisionLog, regret: dict | None) -> dict:
    out = {"counts": log.counts()}
    if regret is not None:
        out["routing_regret"] = regret
    return out

