"""The cluster: receives arrivals, applies admission and routing, and dispatches to replicas.

Dispatch is synchronous: a request arriving at t is in its replica's queue at t. Trace and generator
arrivals fire in the ARRIVE phase of their instant (sim/instant.py), after steps ending then.
"""
from __future__ import annotations

import math

from .instant import ARRIVE, at
from .request import FAILED, FINISHED, REJECTED, Request


class Cluster:
    def __init__(self, env, replicas, router, admission, metrics, response_cache=None):
        self.env = env
        self.replicas = replicas
        self.router = router
        self.admission = admission
        self.metrics = metrics
        self.rejections: dict[str, int] = {}
        self.response_cache = response_cache     # policies/response_cache.py, or None
        self._next_arrival = None        # open loop: exact time of the next arrival event; None: unknown
        self.routable = replicas         # what routers choose from: all, or the active ones (sim/autoscaler.py)
        self.autoscaler = None
        self.arrivals_done = False       # no request will arrive any more
        self.session_logs = None         # agentic sessions: one SessionLog each (traces/sessions.py)
        self.decode_pool = None          # disaggregation: the decode replicas, their router and the KV link
        self.batch = None                # batch jobs waiting for room (sim/batch_jobs.py)
        self.clients = None              # client timeouts and retries (sim/faults.py)
        self.faults = None               # the FaultInjector (sim/faults.py)
        self.crash_policy = "fail"       # what requests on a crashed replica see (faults.in_flight)
        self.orphans: set = set()        # lost in a crash, waiting for their client's timeout
        self.link_factor = 1.0           # share of the KV link's bandwidth left (network faults)
        self._serving: dict = {}         # model -> the routable replicas serving it
        self.counts_only = not (getattr(router, "reads_kv_state", True) or getattr(admission, "reads_kv_state", True))
        self.max_request_tokens = max(r.max_request_tokens for r in replicas)
        for r in replicas:
            r.on_done = self._done
            r.horizon = self.horizon

    def horizon(self) -> float:
        """Until when replicas may run ahead of other replicas' events (the fast decode path). Nothing but an
        arrival reads a replica's state (routing and admission do). When they read only queue counts, which
        a decode run leaves alone, a run goes on until an arrival reaches its replica and cuts it
        (Replica.add). Otherwise runs stop at the next arrival: known in advance for open-loop arrivals;
        with closed-loop clients any completion may bring one, so the next event of any kind."""
        if self.counts_only:
            return math.inf
        if self.decode_pool is not None or self.clients is not None:  # handoffs and retries come between arrivals
            return self.env.peek()
        return self._next_arrival if self._next_arrival is not None else self.env.peek()

    def submit(self, req: Request) -> None:
        now = self.env.now
        self.metrics.on_arrival(req, now)
        if self.clients is not None:
            self.clients.sent(req)
        if self.response_cache is not None and self.response_cache.lookup(req):
            return self._answer_from_cache(req, now)
        if req.total_tokens > self.max_request_tokens:       # fits no replica
            return self._reject(req, self.replicas[0].fits(req), now)
        if req.job >= 0:                                      # a batch job's: waits for room at the cluster
            return self.batch.submit(req)
        reason = self.admission.admit(req, self, now)
        log = self.metrics.decisions
        if log is not None:
            log.admit(req, reason, now)
        if reason:
            return self._reject(req, reason, now)
        pool = self.routable if req.model is None else self.serving(req.model, self.routable)
        if not pool:                                          # every replica that could serve it is down
            return self.fail(req, "no_replica_up")
        rep = pool[self.router.route(req, pool, now)]
        if log is not None:
            log.route(req, pool, rep.index, now)
        self.dispatch(req, rep)

    def dispatch(self, req: Request, rep) -> None:
        reason = rep.fits(req)
        if reason:
            return self._reject(req, reason, self.env.now)
        rep.add(req)

    def serving(self, model: str, pool: list) -> list:
        """The replicas of pool that serve model (requests naming a model go to those only)."""
        key = (model, id(pool))
        got = self._serving.get(key)
        if got is None:
            got = self._serving[key] = [r for r in pool if r.model_name == model]
        return got

    def disaggregate(self, prefill: list, decode: list, decode_router, link) -> None:
        """Route arrivals to the prefill replicas; hand each request with its first token to a decode replica."""
        self.routable, self.decode_pool, self.decode_router, self.link = prefill, decode, decode_router, link
        self.max_request_tokens = min(max(r.max_request_tokens for r in prefill),
                                      max(r.max_request_tokens for r in decode))
        for r in prefill:
            r.prefill_only = True
            r.on_handoff = self.handoff

    def transfer_s(self, req, src) -> float:
        """Seconds to send req's prompt KV from replica src: latency + bytes per GPU / bandwidth; layer-wise,
        the layers sent while the prompt was computed are off the critical path, and at least the last layer's
        share is left."""
        nbytes = src.kv_bytes_per_token * req.prompt_tokens
        t = nbytes / (self.link.bandwidth_gbps * self.link_factor * 1e9)
        if self.link.layerwise:
            t = max(t / src.num_layers, t - (self.env.now - req.first_scheduled))
        return self.link.latency_us * 1e-6 + t

    def handoff(self, req, now: float) -> None:
        src = self.replicas[req.replica]
        pool = self.serving(src.model_name, self.decode_pool)     # its KV is for its prefill replica's model
        if not pool:                                              # every decode replica is down
            src.sent(req)
            return self.fail(req, "no_replica_up")
        j = self.decode_router.route(req, pool, now)
        dst = pool[j] if pool[j].fits(req) is None else next(r for r in pool if r.fits(req) is None)
        t = self.transfer_s(req, src)
        epoch, src_epoch = dst.epoch, src.epoch

        def arrive(_ev):
            if req.outcome or src.epoch != src_epoch:   # failed on the way (a timeout), or its prefill replica crashed
                if req in src.sending:
                    src.sent(req)
                return
            src.sent(req)
            if dst.epoch != epoch:              # its decode replica crashed meanwhile: the KV has nowhere to go
                return self.lost(req)
            req.prefill_replica, req.kv_transfer_s = src.index, t
            req.swapped_tokens, req.num_computed, req.transferred = req.num_computed, 0, True
            req.handoff = False
            dst.add(req)
        at(self.env, t, ARRIVE).callbacks.append(arrive)
        if self.batch is not None:                  # the request left its prefill replica: room there
            self.batch.fill([src])

    def set_routable(self, replicas: list) -> None:
        self.routable = replicas
        self._serving = {}
        if self.batch is not None:
            self.batch.fill(replicas)

    def idle_forever(self) -> bool:
        """Nothing will arrive and nothing is in the system: the autoscaler's clock may stop."""
        return self.arrivals_done and not any(r.outstanding for r in self.replicas)

    def fail(self, req: Request, reason: str, reroute: bool = False) -> None:
        """An attempt ends in failure (a crash, a client timeout, no replica up); the client may retry it."""
        now = self.env.now
        if req in self.orphans:
            self.orphans.discard(req)
            cancel = False
        else:
            cancel = reason == "timeout" and req.replica >= 0
        req.outcome, req.reason, req.finish = FAILED, reason, now
        if cancel:                               # still on its replica: free its place there
            self.replicas[req.replica].cancel(req)
        if self.clients is not None:
            self.clients.failed(req, reroute)
        self._done(req, now)

    def lost(self, req: Request) -> None:
        """req was on a replica that crashed: fail it, leave it to its client's timeout, or resend it."""
        if self.crash_policy == "timeout" and req.job < 0:
            self.orphans.add(req)
        else:
            self.fail(req, "replica_crash", reroute=self.crash_policy == "reroute")

    def _reject(self, req: Request, reason: str, now: float) -> None:
        req.outcome, req.reason, req.finish = REJECTED, reason, now
        self.rejections[reason] = self.rejections.get(reason, 0) + 1
        self._done(req, now)

    def _answer_from_cache(self, req: Request, now: float) -> None:
        """The whole answer at once: every token at the arrival instant, no replica involved."""
        req.first_scheduled = req.first_token = req.last_token = req.finish = now
        req.num_output = req.output_tokens
        req.outcome, req.reason = FINISHED, "response_cache"
        self._done(req, now)

    def _done(self, req: Request, now: float) -> None:
        if self.response_cache is not None and req.outcome == FINISHED:
            self.response_cache.store(req)
        self.metrics.on_done(req, now)
        if self.autoscaler is not None:
            self.autoscaler.on_done(req)
        if self.batch is not None and req.replica >= 0 and req.outcome == FINISHED:
            rep = self.replicas[req.replica]
            if rep.outstanding < rep.fill_to and rep in self.routable:
                self.batch.fill([rep])
        if req.on_finish is not None:
            req.on_finish(req)

    # --- arrival processes -------------------------------------------------------------------
    def _make(self, w, i: int, now: float) -> Request:
        return Request(i, now, int(w.prompt[i]), int(w.output[i]),
                       tenant=w.tenant if w.tenants is None else w.tenants[i],
                       slo_class=w.slo_class if w.slo_classes is None else w.slo_classes[i],
                       session=int(w.sessions[i]) if w.sessions is not None else -1,
                       prefix_ids=w.prefix_ids[i] if w.prefix_ids is not None else None,
                       prefix_block_size=w.prefix_block_size,
                       model=w.model if w.models is None else w.models[i],
                       job=int(w.jobs[i]) if w.jobs is not None else -1)

    def open_loop(self, w):
        env = self.env
        arrival = w.arrival.tolist()
        for i, t in enumerate(arrival):
            if t > env.now:
                self._next_arrival = env.now + (t - env.now)     # as SimPy will compute the event's time
                yield at(env, t - env.now, ARRIVE)
            self.submit(self._make(w, i, env.now))
        self._next_arrival = float("inf")
        self.arrivals_done = True

    def sessions(self, w):
        """Agentic sessions (traces/sessions.py): each starts at its time and sends its turns one after another."""
        from servesim.traces.sessions import SessionLog, Turn
        env = self.env
        self.session_logs = []
        ids = iter(range(1 << 62))
        live = {"n": len(w.conversations)}         # sessions not yet over
        held = {}                                # conversation -> (pool, key) of its last turn's pinned KV

        def release(pin):
            if pin is not None:
                pin[0].now = env.now             # the blocks' LRU time is when they were let go
                pin[0].unpin(pin[1])

        def converse(conv, log, first):
            conv_key = id(conv)
            for item_no, item in enumerate(conv.items):
                if isinstance(item, Turn):
                    if not first and item.think_s and w.think_time_s:
                        think = item.think_s * w.think_time_s
                        log.think_s += think
                        yield env.timeout(think)
                    first = False
                    done = env.event()
                    req = Request(next(ids), env.now, item.prompt, item.output, tenant=w.tenant,
                                  slo_class=w.slo_class, session=log.session, prefix_ids=item.ids,
                                  prefix_block_size=w.prefix_block_size, model=w.model)
                    req.on_finish = lambda r, ev=done: ev.succeed(r)     # r: the last attempt (client retries)
                    if w.retention == "keep":         # what the last turn kept is found again by its hashes
                        release(held.pop(conv_key, None))
                        req.retain_key = (log.session, conv_key, item_no)
                    log.requests.append(req)
                    self.submit(req)
                    last = yield done
                    if w.retention == "keep" and last.outcome == FINISHED and last.replica >= 0:
                        held[conv_key] = (self.replicas[last.replica].pool, last.retain_key)
                else:                            # sub-agents: together, the parent waits for all of them
                    yield env.all_of([env.process(converse(c, log, True)) for c in item])
                    first = False
            release(held.pop(conv_key, None))    # the conversation is over: nothing more to keep

        def session(k, conv):
            log = SessionLog(k, conv.name, env.now)
            self.session_logs.append(log)
            yield from converse(conv, log, True)
            log.end = env.now
            live["n"] -= 1
            self.arrivals_done = live["n"] == 0

        for k, (t, conv) in enumerate(zip(w.session_starts.tolist(), w.conversations)):
            if t > env.now:
                yield at(env, t - env.now, ARRIVE)
            env.process(session(k, conv))

    def closed_loop(self, w):
        """N clients; each sends its next request think_time_s after the previous one ends."""
        env = self.env
        state = {"next": 0, "clients": w.concurrency}
        limit = w.max_requests

        def client():
            while True:
                i = state["next"]
                if (limit is not None and i >= limit) or (w.duration_s is not None and env.now >= w.duration_s):
                    state["clients"] -= 1
                    self.arrivals_done = state["clients"] == 0
                    return
                if i >= len(w):
                    w.extend()
                state["next"] = i + 1
                done = env.event()
                req = self._make(w, i, env.now)
                req.on_finish = lambda r, ev=done: ev.succeed()
                self.submit(req)
                yield done
                if w.think_time_s:
                    yield env.timeout(w.think_time_s)

        for _ in range(w.concurrency):
            env.process(client())
