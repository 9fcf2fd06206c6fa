"""Turn a workload config into requests: a trace replay or a synthetic generator, open or closed loop."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from servesim.sim.errors import TraceError

from .loaders import Trace, load_trace, resolve_path
from .synthetic import arrival_times, sample_lengths


@dataclass
class Workload:
    prompt: np.ndarray
    output: np.ndarray
    arrival: np.ndarray | None          # None for closed loop
    prefix_ids: list | None = None
    prefix_block_size: int = 0
    tenant: str = "default"
    slo_class: str = "default"
    sessions: np.ndarray | None = None  # each request's session (conversation), where the trace has them
    tenants: list | None = None         # a mix: each request's tenant and SLO class (else the two above)
    slo_classes: list | None = None
    concurrency: int = 0                # closed loop: number of clients
    think_time_s: float = 0.0
    duration_s: float | None = None     # closed loop: no new request after this time
    max_requests: int | None = None     # closed loop: no more requests than this (None: until duration_s)
    description: str = ""
    sample_lengths: Callable | None = None   # closed loop: n -> (prompt, output), to draw more lengths
    conversations: list | None = None   # agentic sessions (traces/sessions.py): one per session
    session_starts: np.ndarray | None = None
    retention: str = "evict"
    model: str | None = None            # the model its requests ask for (None: any replica)
    models: list | None = None          # a mix: each request's model (else the one above)
    jobs: np.ndarray | None = None      # each request's batch job (an index into job_specs), -1: online
    job_specs: list | None = None       # batch jobs: JobSpec each

    def __len__(self) -> int:
        return int(self.prompt.size)

    def extend(self, n: int = 65536) -> None:
        """Draw n more (prompt, output) pairs for a closed loop bounded by time, not by count."""
        p, o = self.sample_lengths(n)
        self.prompt = np.concatenate([self.prompt, p])
        self.output = np.concatenate([self.output, o])


@dataclass(frozen=True)
class JobSpec:
    name: str
    submit_s: float
    deadline_s: float                   # absolute: submit + the job's deadline
    num_requests: int
    model: str | None


def cap_total_tokens(prompt: np.ndarray, output: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Shorten prompts (then outputs) so that prompt + output <= cap, as Vidur's trace generator does."""
    over = np.maximum(prompt + output - cap, 0)
    p = prompt - over
    o = output + np.minimum(p - 1, 0)
    return np.maximum(p, 1), np.maximum(o, 1)


def _load_pairs(cfg, rng, n: int, base_dir) -> tuple[np.ndarray, np.ndarray]:
    tr = load_trace(resolve_path(cfg.path, base_dir), cfg.format)
    p, o = tr.prompt, tr.output
    if cfg.max_total_tokens:
        p, o = cap_total_tokens(p, o, cfg.max_total_tokens)
    if cfg.order == "sample":
        idx = rng.integers(0, p.size, n)
    else:
        base = rng.permutation(p.size) if cfg.order == "shuffle" else np.arange(p.size)
        idx = np.resize(base, n)       # cycles through the rows when more requests than rows
    return p[idx], o[idx]


def _lengths(cfg, n: int, rng, base_dir):
    if cfg.kind == "pairs":
        return _load_pairs(cfg, rng, n, base_dir)
    return sample_lengths(cfg.input, n, rng), sample_lengths(cfg.output, n, rng)


def build_workload(cfg, rng: np.random.Generator, base_dir: Path | None = None) -> Workload:
    if cfg.kind == "mix":
        return _mix(cfg, rng, base_dir)
    if cfg.kind == "trace":
        return _from_trace(cfg, rng, base_dir)
    if cfg.kind == "sessions":
        return _sessions(cfg, rng, base_dir)
    if cfg.kind == "batch":
        return _batch(cfg, rng, base_dir)
    a = cfg.arrival
    if a.process == "closed_loop":
        # lengths for every request a client may send; a duration-bounded run draws more as needed
        p, o = _lengths(cfg.lengths, cfg.num_requests or 65536, rng, base_dir)
        return Workload(p, o, None, tenant=cfg.tenant, slo_class=cfg.slo_class, model=cfg.model, concurrency=a.concurrency,
                        think_time_s=a.think_time_s, duration_s=cfg.duration_s, max_requests=cfg.num_requests,
                        description=f"closed loop, {a.concurrency} clients",
                        sample_lengths=lambda n: _lengths(cfg.lengths, n, rng, base_dir))
    t = arrival_times(a, cfg.num_requests, cfg.duration_s, rng) + cfg.start_s
    p, o = _lengths(cfg.lengths, t.size, rng, base_dir)
    return Workload(p, o, t, tenant=cfg.tenant, slo_class=cfg.slo_class, model=cfg.model,
                    description=f"{a.process} arrivals, {t.size} requests")


def _from_trace(cfg, rng, base_dir) -> Workload:
    path = resolve_path(cfg.path, base_dir)
    tr: Trace = load_trace(path, cfg.format, cfg.conversation_interval_s)
    if tr.arrival is None:
        raise TraceError(f"{path}: this trace has lengths but no arrival times; use workload kind 'synthetic' "
                         f"with lengths: {{kind: pairs, path: {cfg.path}}} and an arrival process")
    t = tr.arrival
    keep = t >= cfg.start_s
    if cfg.duration_s is not None:
        keep &= t < cfg.start_s + cfg.duration_s
    if cfg.sample_fraction < 1.0:
        keep &= rng.random(t.size) < cfg.sample_fraction
    idx = np.flatnonzero(keep)
    if cfg.max_requests is not None:
        idx = idx[: cfg.max_requests]
    if idx.size == 0:
        raise TraceError(f"{path}: no requests left after start_s/duration_s/sample_fraction selection")
    t = (t[idx] - cfg.start_s) / cfg.rate_scale
    p, o = tr.prompt[idx], tr.output[idx]
    if cfg.prompt_scale != 1.0:
        p = np.maximum(np.rint(p * cfg.prompt_scale), 1).astype(np.int64)
    if cfg.output_scale != 1.0:
        o = np.maximum(np.rint(o * cfg.output_scale), 1).astype(np.int64)
    if cfg.max_total_tokens:
        p, o = cap_total_tokens(p, o, cfg.max_total_tokens)
    ids = [tr.prefix_ids[i] for i in idx] if tr.prefix_ids is not None else None
    if ids is not None and cfg.prompt_scale != 1.0:
        ids = None  # block ids no longer describe the scaled prompts
    return Workload(p, o, t, ids, tr.prefix_block_size, tenant=cfg.tenant, slo_class=cfg.slo_class, model=cfg.model,
                    sessions=tr.sessions[idx] if tr.sessions is not None else None,
                    description=f"trace {path.name}, {idx.size} requests")


def _sessions(cfg, rng, base_dir) -> Workload:
    from .sessions import load_conversations
    path = resolve_path(cfg.path, base_dir)
    convs = load_conversations(path)
    n = cfg.num_sessions or len(convs)
    if n > len(convs):
        raise TraceError(f"{path}: num_sessions {n} but only {len(convs)} conversations")
    convs = convs[:n]
    starts = arrival_times(cfg.arrival, n, None, rng)
    empty = np.zeros(0, dtype=np.int64)
    turns = sum(c.turns() for c in convs)
    return Workload(empty, empty, None, prefix_block_size=64, tenant=cfg.tenant, slo_class=cfg.slo_class, model=cfg.model,
                    think_time_s=cfg.think_time_scale, max_requests=turns, conversations=convs,
                    session_starts=starts, retention=cfg.retention, description=f"{n} agentic sessions from {path.name}, {turns} turns")


def _batch(cfg, rng, base_dir) -> Workload:
    """Every job's requests arrive at its submit time; lengths drawn per job, on the part's generator in job order."""
    specs, prompt, output, times, jobs = [], [], [], [], []
    for k, j in enumerate(cfg.jobs):
        p, o = _lengths(j.lengths, j.num_requests, rng, base_dir)
        specs.append(JobSpec(j.name, j.submit_s, j.submit_s + j.deadline_s, j.num_requests, j.model))
        prompt.append(p)
        output.append(o)
        times.append(np.full(j.num_requests, float(j.submit_s)))
        jobs.append(np.full(j.num_requests, k))
    t = np.concatenate(times)
    order = np.argsort(t, kind="stable")
    models = [specs[k].model for k in np.concatenate(jobs)[order].tolist()]
    return Workload(np.concatenate(prompt)[order], np.concatenate(output)[order], t[order], tenant=cfg.tenant,
                    slo_class="batch", models=models, jobs=np.concatenate(jobs)[order], job_specs=specs,
                    description=f"{len(specs)} batch jobs, {t.size} requests")


def _mix(cfg, rng, base_dir) -> Workload:
    """Each part built on its own stream of the run's generator, then merged by arrival time (stable: a tie
    keeps part order). Per-request tenants and SLO classes come from the parts."""
    parts = [build_workload(p, np.random.default_rng(s), base_dir)
             for p, s in zip(cfg.parts, rng.bit_generator.seed_seq.spawn(len(cfg.parts)))]
    sizes = {w.prefix_block_size for w in parts if w.prefix_ids is not None}
    if len(sizes) > 1:
        raise TraceError(f"workload.parts: traces with block ids of different sizes ({sorted(sizes)}) cannot be mixed")
    t = np.concatenate([w.arrival for w in parts])
    order = np.argsort(t, kind="stable")
    def cat(field):
        return np.concatenate([getattr(w, field) for w in parts])[order]
    def per_request(get):
        flat = [get(w, i) for w in parts for i in range(len(w))]
        return [flat[j] for j in order.tolist()]
    ids = per_request(lambda w, i: w.prefix_ids[i] if w.prefix_ids is not None else None) if sizes else None
    sessions = None
    if any(w.sessions is not None for w in parts):     # sessions stay distinct across parts
        base = np.cumsum([0] + [int(w.sessions.max()) + 1 if w.sessions is not None else 0 for w in parts])
        sessions = np.concatenate([w.sessions + b if w.sessions is not None else np.full(len(w), -1)
                                   for w, b in zip(parts, base)])[order]
    jobs = specs = None
    if any(w.jobs is not None for w in parts):        # job indices into the parts' job lists, concatenated
        specs = [s for w in parts for s in (w.job_specs or [])]
        base = np.cumsum([0] + [len(w.job_specs or []) for w in parts])
        jobs = np.concatenate([w.jobs + b if w.jobs is not None else np.full(len(w), -1)
                               for w, b in zip(parts, base)])[order]
    return Workload(cat("prompt"), cat("output"), t[order], ids, sizes.pop() if sizes else 0, sessions=sessions,
                    tenants=per_request(lambda w, i: w.tenant), slo_classes=per_request(lambda w, i: w.slo_class),
                    models=per_request(lambda w, i: w.model if w.models is None else w.models[i]),
                    jobs=jobs, job_specs=specs,
                    description="mix of " + "; ".join(f"{w.tenant}/{w.slo_class}: {w.description}" for w in parts))
