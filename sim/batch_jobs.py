"""Batch jobs with deadlines: offline work that fills the capacity online traffic leaves idle.

A job's requests all arrive at its submit time and wait here, at the cluster, not on the replicas (as a batch
API's job queue does). A replica takes them while it has fewer than `fill_to` requests in flight, online ones
included (policies.batch_jobs.fill_to; default its max_num_seqs): when a job is submitted, when a request
leaves the replica, and when the autoscaler adds one. Which request goes next: the job with the earliest
deadline (`edf`) or the earliest submitted (`fifo`), its requests in order. On the replica they queue behind
online requests and are preempted first (policies/batching.py). Nothing cancels a request past its deadline:
the report says how late each job finished.
"""
from __future__ import annotations

import heapq

import numpy as np
import pandas as pd

from .request import FINISHED, REJECTED


class BatchQueue:
    def __init__(self, cluster, specs: list, order: str = "edf"):
        self.cluster = cluster
        self.specs = specs
        self.order = order
        self.pending: dict = {}          # model (None: any) -> heap of (job key, request id, request)

    def _key(self, job: int):
        s = self.specs[job]
        return (s.deadline_s, s.submit_s, job) if self.order == "edf" else (s.submit_s, job)

    def submit(self, req) -> None:
        heapq.heappush(self.pending.setdefault(req.model, []), (self._key(req.job), req.id, req))
        self.fill(self.cluster.routable)

    def __len__(self) -> int:
        return sum(len(h) for h in self.pending.values())

    def fill(self, replicas: list) -> None:
        """Send waiting batch requests to these replicas while they have room, the emptiest first."""
        if not any(self.pending.values()):
            return
        room = [(r.outstanding - r.fill_to, r.index, r) for r in replicas if r.outstanding < r.fill_to]
        heapq.heapify(room)
        while room:
            _, i, rep = room[0]
            heap = self._next_heap(rep)
            if heap is None:
                heapq.heappop(room)
                continue
            req = heapq.heappop(heap)[2]
            self.cluster.dispatch(req, rep)
            if rep.outstanding < rep.fill_to:
                heapq.heapreplace(room, (rep.outstanding - rep.fill_to, i, rep))
            else:
                heapq.heappop(room)

    def _next_heap(self, rep):
        """The heap whose head rep may take next: for any model, or for its own; the earlier job wins."""
        best = None
        for model in (None, rep.model_name):
            h = self.pending.get(model)
            if h and (best is None or h[0] < best[0]):
                best = h
        return best


def job_table(result) -> pd.DataFrame:
    """One row per batch job: its requests, when it was submitted, due and done, and whether it met its deadline."""
    specs = result.workload.job_specs
    reqs = [r for r in result.metrics.requests if r.job >= 0 and not r.retried]    # last attempts
    by_job: dict = {k: [] for k in range(len(specs))}
    for r in reqs:
        by_job[r.job].append(r)
    rows = []
    for k, s in enumerate(specs):
        rs = by_job[k]
        fin = np.array([r.finish for r in rs if r.outcome == FINISHED])
        done = len(fin) == s.num_requests
        end = float(fin.max()) if done else float("nan")
        rows.append({"job": s.name, "model": s.model or "", "submit_s": s.submit_s, "deadline_s": s.deadline_s,
                     "requests": s.num_requests, "finished": int(len(fin)),
                     "finished_by_deadline": int((fin <= s.deadline_s).sum()),
                     "rejected": sum(r.outcome == REJECTED for r in rs),
                     "completed_s": end, "met_deadline": bool(done and end <= s.deadline_s),
                     "lateness_s": end - s.deadline_s if done else float("nan"),
                     "preemptions": sum(r.preemptions for r in rs),
                     "retries": sum(r.attempt for r in rs),
                     "output_tokens": sum(r.num_output for r in rs)})
    return pd.DataFrame(rows)


def jobs_report(jt: pd.DataFrame) -> dict:
    return {"jobs": int(len(jt)), "met_deadline": int(jt["met_deadline"].sum()),
            "requests": int(jt["requests"].sum()), "finished_by_deadline": int(jt["finished_by_deadline"].sum()),
            "by_job": {r["job"]: {k: (None if isinstance(v, float) and v != v else v)
                                  for k, v in r.items() if k != "job"} for r in jt.to_dict("records")}}
