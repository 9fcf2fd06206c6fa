"""Append-only run metrics: request records, a streaming ITL histogram, per-replica counters and
sampled time series. The report is a pure function of these plus the config."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


class StreamingHistogram:
    """Log-spaced bins from 1 us to 10^4 s, 1000 per decade: any quantile is within 0.12% relative
    of an exact one (half a bin). Count, sum and max are exact. Memory is fixed (8000 bins).

    Each value comes with the simulated time it was observed at, and is also counted in one of up to
    2 x SECTIONS equal time sections (each row of `by_section`, `section_s` wide): the sections of sectioning
    intervals (sim/intervals.py). When time passes the last section, neighbours merge pairwise and the width
    doubles, so memory stays fixed however long the run."""

    LO, DECADES, PER_DECADE = 1e-6, 10, 1000
    SECTIONS = 10

    def __init__(self):
        self.counts = np.zeros(self.DECADES * self.PER_DECADE + 2, dtype=np.int64)  # [underflow, bins..., overflow]
        self.by_section = np.zeros((2 * self.SECTIONS, self.counts.size), dtype=np.int64)
        self.section_s = 1e-3
        self.t0 = None                      # sections start here: the run's first arrival (Metrics sets it), else
                                            # the earliest value of the first flush
        self.n = 0
        self.total = 0.0
        self.max = 0.0
        self._buf: list[float] = []
        self._buf_t: list = []              # (time, values added then) of add_list
        self._runs: list = []               # (values, times each, observation times) from add_array
        self._run_len = 0

    def add(self, x: float, t: float = 0.0) -> None:
        self.add_list([x], t)

    def add_list(self, xs: list, t: float = 0.0) -> None:
        """Values observed at time t."""
        if xs:
            self._buf.extend(xs)
            self._buf_t.append((t, len(xs)))
            if len(self._buf) >= 65536:
                self.flush()

    def add_array(self, v: np.ndarray, n: int, t: np.ndarray) -> None:
        """Each value of v, n times, v[j] observed at t[j] (a run of decode steps: one gap per step, for each of n
        sequences)."""
        if len(v):
            self._runs.append((v, n, t))
            self._run_len += len(v)
            if self._run_len >= 65536:
                self.flush()

    def flush(self) -> None:
        parts = []
        if self._buf:
            t = np.repeat([a for a, _ in self._buf_t], [k for _, k in self._buf_t])
            parts.append((np.asarray(self._buf, dtype=float), None, t))
            self._buf, self._buf_t = [], []
        if self._runs:
            v = np.concatenate([r[0] for r in self._runs])
            w = np.repeat([r[1] for r in self._runs], [len(r[0]) for r in self._runs])
            t = np.concatenate([r[2] for r in self._runs])
            parts.append((v, w, t))
            self._runs, self._run_len = [], 0
        if parts and self.t0 is None:
            self.t0 = min(float(t.min()) for _, _, t in parts)
        for v, w, t in parts:
            self._bin(v, w, t)

    def _bin(self, v: np.ndarray, w: np.ndarray | None, t: np.ndarray) -> None:
        """Count v (each value w times, once without w), observed at times t."""
        self.n += v.size if w is None else int(w.sum())
        self.total += float(v.sum() if w is None else (v * w).sum())
        self.max = max(self.max, float(v.max()))
        with np.errstate(divide="ignore"):
            idx = np.floor(np.log10(np.maximum(v, 1e-300) / self.LO) * self.PER_DECADE).astype(np.int64) + 1
        np.clip(idx, 0, self.counts.size - 1, out=idx)
        nb = self.counts.size
        delta = np.bincount(idx, weights=w, minlength=nb).astype(np.int64)
        self.counts += delta
        rows = len(self.by_section)
        t = np.maximum(t - self.t0, 0.0)
        while float(t.max()) >= rows * self.section_s:          # merge neighbours, double the width
            s = self.by_section
            s[: rows // 2] = s[0::2] + s[1::2]
            s[rows // 2:] = 0
            self.section_s *= 2
        sec = np.minimum((t / self.section_s).astype(np.int64), rows - 1)
        lo, hi = int(sec.min()), int(sec.max())
        if lo == hi:                                            # one section (the usual case): all of delta
            self.by_section[lo] += delta
            return
        for k in range(lo, hi + 1):
            m = sec == k
            self.by_section[k] += np.bincount(idx[m], weights=None if w is None else w[m], minlength=nb).astype(np.int64)

    def section_quantiles(self, q: float, min_count: int = 1) -> list:
        """The q-quantile of each time section with at least min_count values (for sectioning intervals)."""
        self.flush()
        return [self._quantile(c, int(c.sum()), q) for c in self.by_section if c.sum() >= min_count]

    def section_means(self, min_count: int = 1) -> list:
        """The mean of each time section with at least min_count values, from its bins' centres (within 0.12%
        of the exact mean)."""
        self.flush()
        centres = self.LO * 10 ** ((np.arange(self.counts.size) - 0.5) / self.PER_DECADE)
        return [float((c * centres).sum() / c.sum()) for c in self.by_section if c.sum() >= min_count]

    def quantile(self, q: float) -> float:
        self.flush()
        if self.n == 0:
            return math.nan
        return self._quantile(self.counts, self.n, q)

    def _quantile(self, counts: np.ndarray, n: int, q: float) -> float:
        rank = q * (n - 1)
        i = int(np.searchsorted(np.cumsum(counts), rank, side="right"))
        if i == 0:
            return 0.0
        if i >= counts.size - 1:
            return self.max
        lo = self.LO * 10 ** ((i - 1) / self.PER_DECADE)
        hi = self.LO * 10 ** (i / self.PER_DECADE)
        return min(math.sqrt(lo * hi), self.max)

    def mean(self) -> float:
        self.flush()
        return self.total / self.n if self.n else math.nan


# where a replica's busy seconds went, per kind of step: ops bound by compute, ops bound by memory bandwidth,
# collectives, per-step CPU overhead (all from the step-time model's split), KV copied in or out before a step
# (offload loads, swaps); what a model cannot split (linear, measured) is busy time in none of them
TIME_PARTS = ("compute_s", "memory_s", "collective_s", "overhead_s", "kv_load_s")
STEP_KINDS = ("decode", "prefill")     # steps of decodes only; steps with prompt tokens (possibly with decodes)
BLOCKERS = ("max_num_seqs", "token_budget", "kv_blocks", "policy")


@dataclass
class ReplicaStats:
    iterations: int = 0
    busy_s: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    swaps: int = 0                 # preemptions that swapped the KV out (the rest recomputed)
    swap_s: float = 0.0            # seconds of swap-out and swap-in copies
    kv_block_seconds: float = 0.0  # integral of referenced KV blocks over busy time
    samples: list = field(default_factory=list)  # (t, waiting, running, kv_used_blocks)
    last_sample: float = -math.inf
    # attribution, per step kind (STEP_KINDS): steps, busy seconds, sequences summed over steps, TIME_PARTS
    kind_steps: list = field(default_factory=lambda: [0, 0])
    kind_s: list = field(default_factory=lambda: [0.0, 0.0])
    kind_seqs: list = field(default_factory=lambda: [0, 0])
    kind_parts: list = field(default_factory=lambda: [[0.0] * 5, [0.0] * 5])
    # busy seconds of steps that left requests waiting, by what kept the queue's head out (BLOCKERS)
    blocked_s: dict = field(default_factory=lambda: dict.fromkeys(BLOCKERS, 0.0))
    preempt_times: list = field(default_factory=list)
    kv_blocks_lost: int = 0        # blocks holding KV (in use or cached) when the replica crashed (sim/faults.py)

    def add_step(self, dt: float, st, prefill: int, decode: int, kv_used: int, load_s: float = 0.0,
                 pp: int = 1, seqs: int = 0) -> None:
        """One engine iteration of seqs sequences that kept the replica busy dt seconds with kv_used blocks
        referenced: st is the model's StepTime (its split scaled to one of pp pipeline stages), load_s the KV
        copies before it."""
        self.iterations += 1
        self.busy_s += dt
        self.flops += st.flops
        self.bytes += st.bytes
        self.prefill_tokens += prefill
        self.decode_tokens += decode
        self.kv_block_seconds += kv_used * dt
        k = 1 if prefill else 0
        self.kind_steps[k] += 1
        self.kind_s[k] += dt
        self.kind_seqs[k] += seqs
        p = self.kind_parts[k]
        p[0] += st.compute_s / pp           # x / 1 is x exactly
        p[1] += st.memory_s / pp
        p[2] += st.collective_s / pp
        p[3] += st.overhead_s / pp
        p[4] += load_s

    def add_steps(self, dt, flops: float, nbytes: float, parts: list, prefill: int, decode: int, kv_used) -> None:
        """add_step for each of the steps whose seconds are dt (a decode run's, priced in closed form, so their
        FLOPs, bytes and 4 parts come summed: within 1e-12 of the per-step path)."""
        n = len(dt)
        k = 1 if prefill else 0
        p = self.kind_parts[k]
        busy = float(np.add.reduce(dt))
        self.busy_s += busy
        self.kind_s[k] += busy
        self.flops += flops
        self.bytes += nbytes
        self.kv_block_seconds += float(kv_used @ dt)
        for i, x in enumerate(parts):
            p[i] += x
        self.iterations += n
        self.prefill_tokens += prefill * n
        self.decode_tokens += decode * n
        self.kind_steps[k] += n
        self.kind_seqs[k] += decode * n


class Metrics:
    def __init__(self, num_replicas: int, sample_interval_s: float, bucket_s: float = 1.0):
        self.requests: list = []
        self.itl = StreamingHistogram()
        self.replicas = [ReplicaStats() for _ in range(num_replicas)]
        self.sample_interval_s = sample_interval_s
        self.bucket_s = bucket_s
        self._tokens = [[] for _ in range(num_replicas)]   # output tokens per replica and bucket (Python lists:
        self._buckets = 0                                  # one += per step, cheaper than a numpy element)
        # Little's law instrument: time-integral of requests in the system, kept independently
        self.in_system = 0
        self.done = 0                   # finished or rejected
        self.in_system_integral = 0.0
        self.trace = None               # a StepTrace when every iteration is recorded (--trace-events)
        self.decisions = None           # a DecisionLog with --trace-level decisions (sim/decisions.py)
        self._last_change = 0.0

    def _in_system_step(self, now: float, delta: int) -> None:
        self.in_system_integral += self.in_system * (now - self._last_change)
        self._last_change = now
        self.in_system += delta

    def on_arrival(self, req, now: float) -> None:
        if self.itl.t0 is None:         # ITL's time sections start with the run (the same on either decode path)
            self.itl.t0 = now
        self.requests.append(req)
        self._in_system_step(now, +1)

    def on_done(self, req, now: float) -> None:
        self.done += 1
        self._in_system_step(now, -1)

    @property
    def replica_tokens(self) -> np.ndarray:
        """Output tokens per replica (rows) and bucket of bucket_s seconds (columns, up to the last one reached)."""
        out = np.zeros((len(self._tokens), max(self._buckets, 1)), dtype=np.int64)
        for i, row in enumerate(self._tokens):
            out[i, :len(row)] = row
        return out

    @property
    def tokens_per_bucket(self) -> np.ndarray:
        """Output tokens of the whole fleet per bucket."""
        return self.replica_tokens.sum(axis=0)

    def _row(self, replica: int, b: int) -> list:
        """replica's list of tokens per bucket, long enough to hold bucket b."""
        row = self._tokens[replica]
        if b >= len(row):
            row.extend([0] * (b + 1 - len(row)))
            if b >= self._buckets:
                self._buckets = b + 1
        return row

    def on_tokens(self, now: float, n: int, replica: int) -> None:
        """n output tokens sampled at `now` by `replica`."""
        b = int(now / self.bucket_s)
        self._row(replica, b)[b] += n

    def on_tokens_array(self, times: np.ndarray, n: int, replica: int) -> None:
        """on_tokens(t, n, replica) for each of the (increasing) times."""
        first = int(float(times[0]) / self.bucket_s)
        last = int(float(times[-1]) / self.bucket_s)
        row = self._row(replica, last)
        if first == last:                                   # one bucket (the common case)
            row[last] += n * len(times)
            return
        counts = np.bincount((times / self.bucket_s).astype(np.int64) - first).tolist()
        for j, c in enumerate(counts):
            row[first + j] += n * c

    def sample_steps(self, i: int, times: list, waiting: int, running: int, kv_used) -> None:
        """sample() at each of the (increasing) times, with the same test, so the same samples are kept."""
        st = self.replicas[i]
        last, iv = st.last_sample, self.sample_interval_s
        for j, t in enumerate(times):
            if t - last >= iv:
                st.samples.append((t, waiting, running, int(kv_used[j])))
                last = t
        st.last_sample = last

    def sample(self, i: int, now: float, waiting: int, running: int, kv_used: int, force: bool = False) -> None:
        st = self.replicas[i]
        if force or now - st.last_sample >= self.sample_interval_s:
            st.samples.append((now, waiting, running, kv_used))
            st.last_sample = now
