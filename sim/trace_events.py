"""Every engine iteration of a run, for `servesim run --trace-events FILE` (Chrome / Perfetto trace).

Recorded columnar (one list per field; decode runs append arrays), written as the Trace Event Format
that ui.perfetto.dev and chrome://tracing open: one track per replica with a slice per iteration
(prefill tokens, decode sequences, KV blocks referenced, queue), and counter tracks of KV blocks and
waiting requests per replica. Times are simulated microseconds.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIELDS = ("replica", "start", "dur", "prefill", "decode", "kv_used", "waiting", "running",
          "compute_s", "memory_s", "collective_s", "overhead_s", "kv_load_s")   # the last five: where dur went


class StepTrace:
    def __init__(self):
        self.cols: dict[str, list] = {f: [] for f in FIELDS}
        self._arrays: list[dict] = []

    def step(self, replica: int, start: float, dur: float, prefill: int, decode: int, kv_used: int,
             waiting: int, running: int, st, load_s: float, pp: int) -> None:
        """st: the step's StepTime, whose split (per pipeline stage: / pp) is recorded with the KV load time."""
        c = self.cols
        for f, v in zip(("compute_s", "memory_s", "collective_s", "overhead_s"), st[3:]):
            c[f].append(v / pp)
        c["kv_load_s"].append(load_s)
        c["replica"].append(replica)
        c["start"].append(start)
        c["dur"].append(dur)
        c["prefill"].append(prefill)
        c["decode"].append(decode)
        c["kv_used"].append(kv_used)
        c["waiting"].append(waiting)
        c["running"].append(running)

    def steps(self, replica: int, starts: np.ndarray, durs: np.ndarray, prefill: int, decode: int,
              kv_used: np.ndarray, waiting: int, running: int, parts: np.ndarray) -> None:
        """A run of steps that share their token counts (a decode run); parts: their 4 x n StepTime split."""
        n = len(starts)
        self._arrays.append({"replica": np.full(n, replica), "start": np.asarray(starts, float),
                             "dur": np.asarray(durs, float), "prefill": np.full(n, prefill),
                             "decode": np.full(n, decode), "kv_used": np.asarray(kv_used),
                             "waiting": np.full(n, waiting), "running": np.full(n, running),
                             "compute_s": parts[0].copy(), "memory_s": parts[1].copy(),
                             "collective_s": parts[2].copy(), "overhead_s": parts[3].copy(),
                             "kv_load_s": np.zeros(n)})

    def table(self) -> dict[str, np.ndarray]:
        """All steps as arrays, ordered by (replica, start)."""
        parts = [{f: np.asarray(v) for f, v in self.cols.items()}] + self._arrays
        t = {f: np.concatenate([p[f] for p in parts]) for f in FIELDS}
        order = np.lexsort((t["start"], t["replica"]))
        return {f: v[order] for f, v in t.items()}

    def write(self, path: Path, names: list[str]) -> int:
        """Write the Chrome trace JSON; names[i] labels replica i. Returns the number of iterations."""
        t = self.table()
        events = [{"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "servesim"}}]
        events += [{"ph": "M", "name": "thread_name", "pid": 0, "tid": i, "args": {"name": f"replica {i}: {n}"}}
                   for i, n in enumerate(names)]
        cols = {f: v.tolist() for f, v in t.items()}
        for r, s, d, p, dec, kv, w, run, tc, tm, tcol, tov, tl in zip(*(cols[f] for f in FIELDS)):
            ts = s * 1e6
            name = "prefill+decode" if p and dec else ("prefill" if p else "decode")
            events.append({"ph": "X", "name": name, "cat": "step", "pid": 0, "tid": r, "ts": ts, "dur": d * 1e6,
                           "args": {"prefill_tokens": p, "decode_seqs": dec, "kv_blocks": kv,
                                    "waiting": w, "running": run, "compute_bound_us": tc * 1e6,
                                    "memory_bound_us": tm * 1e6, "collective_us": tcol * 1e6,
                                    "cpu_overhead_us": tov * 1e6, "kv_load_us": tl * 1e6}})
            events.append({"ph": "C", "name": f"replica {r} KV blocks", "pid": 0, "ts": ts, "args": {"used": kv}})
            events.append({"ph": "C", "name": f"replica {r} waiting", "pid": 0, "ts": ts, "args": {"requests": w}})
        Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
        return len(cols["start"])
