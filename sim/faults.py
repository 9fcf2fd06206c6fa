"""Fault injection and client retries.

Faults (config `faults`) happen at fixed times or as Poisson processes:
- crash: the replica dies. Its requests are lost with their KV cache, and the whole pool is empty when it
  comes back after its restart delay (a cold start: weights per GPU / load_gbps + engine_startup_s).
  What its requests see is `faults.in_flight`:
  - fail: an error at once, which the client may retry;
  - timeout: nothing until the client's timeout;
  - reroute: the gateway resends them at once.
- node_loss: every replica with a GPU on the node crashes. Replicas are packed onto nodes of
  gpus_per_node GPUs in fleet order, and a replica larger than a node spans several.
- straggler: for duration_s, the steps a replica starts take slowdown x longer.
- network: for duration_s, KV transfers from prefill to decode replicas that start then get bandwidth_factor x
  the link's bandwidth.

Clients (config `client`) give up on an attempt that has not finished timeout_s after it was sent. They
resend a failed or timed-out request up to max_retries times, after backoff_s x 2^k. Each attempt is a
request record of its own. A retry keeps the original's arrival time, so its latency is what the user
saw, and its `origin` id, so the report counts each request once, by its last attempt. Batch-job requests
lost in a crash go back to their job's queue at once.
"""
from __future__ import annotations

import math

from .instant import ARRIVE, at
from .request import FAILED, Request

RETRY_IDS = 1 << 40          # attempt ids start here, above any workload's request ids


def node_map(gpus: list[int], gpus_per_node: int) -> list[list[int]]:
    """The nodes each replica has GPUs on, packing replicas in order: a replica starts a new node when it does
    not fit in what is left of the current one."""
    out, node, used = [], 0, 0
    for g in gpus:
        if used and used + g > gpus_per_node:
            node, used = node + 1, 0
        span = max(1, math.ceil(g / gpus_per_node))
        out.append(list(range(node, node + span)))
        if g >= gpus_per_node:
            node, used = node + span, 0
        else:
            used += g
    return out


class Clients:
    """Timeouts and retries of the clients behind every online request."""

    def __init__(self, env, cluster, cfg):
        self.env, self.cluster, self.cfg = env, cluster, cfg
        self._ids = RETRY_IDS

    def sent(self, req: Request) -> None:
        if self.cfg.timeout_s is not None and req.job < 0:
            at(self.env, self.cfg.timeout_s, ARRIVE).callbacks.append(lambda _ev: self._expire(req))

    def _expire(self, req: Request) -> None:
        if not req.outcome:                         # still not finished: give up on this attempt
            self.cluster.fail(req, "timeout")

    def failed(self, req: Request, reroute: bool = False) -> None:
        """An attempt failed: resend it after the backoff if retries are left (at once, and whatever the count,
        when the gateway reroutes it or it belongs to a batch job)."""
        if req.job >= 0 or reroute:
            self._retry(req, 0.0)
        elif req.attempt < self.cfg.max_retries:
            self._retry(req, self.cfg.backoff_s * 2 ** req.attempt)

    def _retry(self, req: Request, delay: float) -> None:
        new = Request(self._ids, req.arrival, req.prompt_tokens, req.output_tokens, tenant=req.tenant,
                      slo_class=req.slo_class, session=req.session, prefix_ids=req.prefix_ids,
                      prefix_block_size=req.prefix_block_size, model=req.model, job=req.job)
        self._ids += 1
        new.attempt, new.origin = req.attempt + 1, req.origin
        new.on_finish, new.retain_key = req.on_finish, req.retain_key
        req.on_finish, req.retried = None, True

        def send(_ev=None):
            new.sent = self.env.now
            self.cluster.submit(new)
        if delay:
            at(self.env, delay, ARRIVE).callbacks.append(send)
        else:
            send()


class FaultInjector:
    def __init__(self, env, cluster, cfg, restart_s: list[float], nodes: list[list[int]], rng):
        self.env, self.cluster, self.cfg = env, cluster, cfg
        self.restart_s = restart_s               # per replica
        self.nodes = nodes                       # per replica: the nodes it has GPUs on
        self.num_nodes = max(n for ns in nodes for n in ns) + 1
        self.rng = rng
        self.prefill_all = list(cluster.routable)
        self.decode_all = list(cluster.decode_pool) if cluster.decode_pool is not None else None
        self.events: list[dict] = []             # what happened, for the report
        self.up_changes: list[tuple] = []        # (t, replica, up)
        for i, e in enumerate(cfg.events):
            if e.kind == "node_loss" and e.node >= self.num_nodes:
                from .errors import ConfigError
                raise ConfigError(f"faults.events[{i}].node: {e.node} is not a node of this fleet "
                                  f"(0..{self.num_nodes - 1} at {cfg.gpus_per_node} GPUs per node)")
            at(env, e.at_s, ARRIVE).callbacks.append(lambda _ev, e=e: self.inject(e.kind, e))
        for spec in cfg.random:
            units = range(self.num_nodes) if spec.kind == "node_loss" else range(len(cluster.replicas))
            for u in units:
                env.process(self._poisson(spec, u))

    def _poisson(self, spec, unit: int):
        gap = 3600.0 / spec.rate_per_hour
        while True:
            yield self.env.timeout(float(self.rng.exponential(gap)))
            if self.cluster.idle_forever():      # nothing left to serve: the process ends with the run
                return
            self.inject(spec.kind, spec, unit)

    def inject(self, kind: str, e, unit: int | None = None) -> None:
        now = self.env.now
        if kind == "crash":
            i = e.replica if unit is None else unit
            self.crash([i], {"kind": kind, "t": now, "replicas": [i]})
        elif kind == "node_loss":
            node = e.node if unit is None else unit
            hit = [i for i, ns in enumerate(self.nodes) if node in ns]
            self.crash(hit, {"kind": kind, "t": now, "node": node, "replicas": hit})
        elif kind == "straggler":
            i = e.replica if unit is None else unit
            rep = self.cluster.replicas[i]
            rep.slow *= e.slowdown
            rep.cut_run()
            self.events.append({"kind": kind, "t": now, "replicas": [i], "slowdown": e.slowdown, "until": now + e.duration_s})

            def end(_ev):
                rep.slow /= e.slowdown
                rep.cut_run()
            at(self.env, e.duration_s, ARRIVE).callbacks.append(end)
        else:                                    # network
            c = self.cluster
            c.link_factor *= e.bandwidth_factor
            self.events.append({"kind": kind, "t": now, "replicas": [], "bandwidth_factor": e.bandwidth_factor,
                                "until": now + e.duration_s})

            def end(_ev):
                c.link_factor /= e.bandwidth_factor
            at(self.env, e.duration_s, ARRIVE).callbacks.append(end)

    def crash(self, indices: list[int], record: dict) -> None:
        """Replicas die now; each comes back after its restart delay (a crash while down changes nothing)."""
        c, now = self.cluster, self.env.now
        down = [i for i in indices if c.replicas[i].up]
        record["replicas"] = down
        record["until"] = max((now + self.restart_s[i] for i in down), default=now)
        self.events.append(record)
        lost = []
        for i in down:
            rep = c.replicas[i]
            lost += rep.crash()
            self.up_changes.append((now, i, False))
            at(self.env, self.restart_s[i], ARRIVE).callbacks.append(lambda _ev, rep=rep: self._restart(rep))
        self._pools()
        record["requests_lost"] = len(lost)
        for req in lost:
            c.lost(req)

    def _restart(self, rep) -> None:
        rep.up = True
        self.up_changes.append((self.env.now, rep.index, True))
        self._pools()

    def _pools(self) -> None:
        c = self.cluster
        if self.decode_all is not None:
            c.decode_pool = [r for r in self.decode_all if r.up]
        c.set_routable([r for r in self.prefill_all if r.up])
