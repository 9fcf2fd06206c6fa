"""One replica's engine loop (one SimPy process): schedule, price the step, wait, apply results.

Batches are formed in the SCHEDULE phase of an instant (sim/instant.py): after every step that
ends at that instant has been applied and every request arriving then has been routed.

With pipeline parallelism (pp > 1) the replica keeps up to pp micro-batches in flight, as vLLM's
batch queue does: a step priced at t by the model takes t / pp on each stage; a new micro-batch
enters the first stage as soon as that stage is free; it finishes when it leaves the last stage
(stage k starts when stage k-1 is done with it and stage k is done with the micro-batch before).
A request sits out while its micro-batch is in the pipeline: it is not in `running`, so the policy
neither schedules nor preempts it. With too few requests to fill pp micro-batches, stages idle
(the pipeline bubble), and a lone request's step still takes the whole t.
"""
from __future__ import annotations

import math
from collections import deque

from servesim.hwmodels.step_time import BatchShape

from .decode_run import DecodeRun
from .instant import COMPLETE, SCHEDULE, advance, at, at_time, move
from .request import FINISHED


class Replica:
    def __init__(self, env, index: int, scheduler, pool, model, metrics, *, max_model_len: int,
                 check_invariants: bool = False, pp: int = 1, fast_decode: bool = True,
                 stop_time: float = math.inf, swap=None):
        self.env = env
        self.index = index
        self.scheduler = scheduler
        self.pool = pool
        self.model = model
        self.metrics = metrics
        self.stats = metrics.replicas[index]
        self.max_model_len = max_model_len
        self.check_invariants = check_invariants
        self.waiting: deque = deque()
        self.running: list = []             # admitted and not in the pipeline: what the policy may schedule
        self.pp = pp
        self.stage_free = [0.0] * pp         # when each pipeline stage finishes its current micro-batch
        self.flying: list = []               # micro-batches in the pipeline (pp > 1)
        self.num_flying = 0                  # requests in them
        self.outstanding = 0                 # waiting + running + flying: changes on add and on finish only
        self.num_batch = 0                   # of them, batch-job requests (sim/batch_jobs.py)
        self.fill_to = 0                     # batch requests come while outstanding < this (policies.batch_jobs)
        self.model_name = ""                 # the model it serves (catalog name): requests naming a model come
        self._wakeup = None
        self._run = self._run_end = None     # the decode run in progress and the event that ends it
        self._ids = getattr(model, "needs_ids", False)     # a model with per-request state (measured backend)
        self._release = getattr(model, "release", None)
        self.stop_time = stop_time          # sim.max_sim_time_s: no step ending then or later is applied
        self.horizon = env.peek             # set by the cluster: until when nothing reads this replica's state
        # runs of pure-decode steps skip the policy when it says they are steady (sim/decode_run.py)
        self.fast_decode = (fast_decode and pp == 1 and not self._ids and hasattr(scheduler, "steady_decode")
                            and hasattr(model, "decode_steps"))
        self.on_done = None                 # cluster callback(req, now)
        self.on_handoff = None              # cluster callback(req, now): a prefill replica's request has its first token
        self.sending: list = []             # requests whose KV is being sent to a decode replica (blocks held)
        # faults (sim/faults.py): down after a crash until restarted; epoch counts crashes, so a step in progress
        # when it crashed is dropped; slow multiplies step times (a straggler); cancelled: given up by clients
        self.up, self.epoch, self.slow = True, 0, 1.0
        self.cancelled: list = []
        self.prefill_only = False
        self.capacity = 1.0                 # decode tokens/s at a reference batch (run.decode_capacity): routers
        self.usd_per_hour = 0.0             # what the replica's GPUs cost per hour
        self.group = ""                     # its replica group's name (fleet.replicas[].name)
        # preemption by swapping: (CPU capacity in blocks, seconds to copy one block); None: recompute
        self.swap, self.swap_used = swap, 0
        self.pending_s = 0.0                # copy time owed by the step being formed (swap-outs)
        self.process = env.process(self._loop())

    # --- read-only view for routers and admission --------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running) + self.num_flying

    @property
    def kv_free_fraction(self) -> float:
        return self.pool.num_free / self.pool.num_blocks

    def cached_prefix_tokens(self, req) -> int:
        """Prompt tokens this replica's prefix cache holds for req (what a prefix-aware router scores)."""
        return len(self.pool.lookup(req, req.prompt_tokens)) * self.pool.block_size

    def fits(self, req) -> str | None:
        if req.total_tokens > self.max_model_len:
            return "exceeds_max_model_len"
        if self.pool.blocks_needed(req.total_tokens) > self.pool.num_blocks:
            return "exceeds_kv_capacity"
        return None

    @property
    def max_request_tokens(self) -> int:
        """The longest request (prompt + output) that fits() accepts."""
        return min(self.max_model_len, self.pool.num_blocks * self.pool.block_size)

    # --- queue operations used by the batching policy -----------------------------------
    def add(self, req) -> None:
        req.replica = self.index
        if req.job >= 0:
            self.num_batch += 1
            self.waiting.append(req)
        else:                                            # online requests queue ahead of batch ones
            self._before_batch(req)
        self.outstanding += 1
        self.cut_run()
        self._wake()

    def cut_run(self) -> None:
        """Something changes now (an arrival, a cancellation, a slowdown): a decode run in progress stops after
        the step running now, as the plain path would next schedule then."""
        if self._run is not None and self._run.cut(self.env.now):
            self._run_end = move(self.env, self._run_end, self._run.end, COMPLETE)

    def cancel(self, req) -> None:
        """A client gave up on req (already marked failed): out of the waiting queue now; a request in a step
        leaves when the step ends (as vLLM aborts between steps); one being sent is released when it lands."""
        if req.handoff:
            return
        try:
            self.waiting.remove(req)
        except ValueError:
            self.cancelled.append(req)
            self.cut_run()
            return
        self._left(req)

    def _left(self, req) -> None:
        self.outstanding -= 1
        if req.job >= 0:
            self.num_batch -= 1

    def _drop_cancelled(self) -> None:
        keep = []
        for req in self.cancelled:
            if req in self.running:
                self.running.remove(req)
            elif any(r is req for b in self.flying for r, _ in b):
                keep.append(req)                  # in the pipeline: dropped once its micro-batch lands
                continue
            self.pool.free(req)
            if self._release:
                self._release(req.id)
            self._left(req)
        self.cancelled = keep

    def crash(self) -> list:
        """Everything on the replica is lost: its requests (returned, in queue order: running, in flight, being
        sent, waiting) and its KV cache. A step in progress is dropped when it ends (the epoch moved on)."""
        lost = self.running + [r for b in self.flying for r, _ in b if not r.outcome and not r.handoff] \
            + self.sending + list(self.waiting)
        lost = [r for r in dict.fromkeys(lost) if not r.outcome]
        for r in lost:
            r.blocks = []
        pending = self._run.blocks_taken_by(self.env.now) if self._run is not None else 0
        self.stats.kv_blocks_lost += self.pool.crash() + pending
        self.up = False
        self.epoch += 1
        self.waiting.clear()
        self.running, self.flying, self.sending, self.cancelled = [], [], [], []
        self.num_flying = self.outstanding = self.num_batch = 0
        self.stage_free = [self.env.now] * self.pp
        self.swap_used, self.pending_s = 0, 0.0
        self._run = None
        return lost

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.triggered:
            self._wakeup.succeed()

    def preempt(self, req) -> None:
        """Recompute preemption, or swap when configured and the CPU swap space has room: the KV is copied out
        in the step being formed and back in the step that readmits it (swap_in), nothing is recomputed."""
        n = -(-req.num_computed // self.pool.block_size)      # blocks holding computed KV (swap_in: the same)
        if self.swap is not None and n and self.swap_used + n <= self.swap[0]:
            self.swap_used += n
            req.swapped_tokens = req.num_computed
            self.pending_s += n * self.swap[1]
            self.stats.swaps += 1
            self.stats.swap_s += n * self.swap[1]
        self.pool.free(req)
        if self._release:
            self._release(req.id)
        if self.metrics.decisions is not None:
            self.metrics.decisions.preempt(self, req)
        if not req.lost:                      # a preemption while recovering from one extends that one
            req.preempted_at = self.env.now
        req.lost = max(req.lost, req.num_computed, 1)
        req.num_computed = 0
        req.preemptions += 1
        self.stats.preemptions += 1
        self.stats.preempt_times.append(self.env.now)
        if req.job >= 0:                      # batch work: behind the online requests waiting, first of its kind
            self._before_batch(req)
        else:
            self.waiting.appendleft(req)

    def _before_batch(self, req) -> None:
        """Queue req behind every waiting online request and ahead of every waiting batch one (those sit at
        the back)."""
        waiting = self.waiting
        i = len(waiting)
        while i and waiting[i - 1].job >= 0:
            i -= 1
        if i == len(waiting):
            waiting.append(req)
        else:
            waiting.insert(i, req)

    def swap_in(self, req) -> None:
        """A swapped-out request is readmitted with its blocks allocated: copy its KV back, in this step. (A
        request whose KV came from a prefill replica has it already: nothing to copy.)"""
        if req.transferred:
            req.transferred, req.swapped_tokens = False, 0
            return
        n = -(-req.swapped_tokens // self.pool.block_size)
        self.swap_used -= n
        req.load_s += n * self.swap[1]
        self.stats.swap_s += n * self.swap[1]
        req.swapped_tokens = 0

    # --- the loop -----------------------------------------------------------------------
    def _loop(self):
        env, pool, stats, metrics = self.env, self.pool, self.stats, self.metrics
        while True:
            if self.cancelled:
                self._drop_cancelled()
            if not self.waiting and not self.running:
                if not self.num_flying:
                    metrics.sample(self.index, env.now, 0, 0, pool.num_used, force=True)
                yield from self._sleep()
                continue                         # woken by an arrival or by a micro-batch landing
            if env.peek() == env.now:            # other events at this instant: let them go first
                yield at(env, 0.0, SCHEDULE)
                if self.cancelled or (not self.waiting and not self.running):
                    continue                     # a client gave up, or a crash emptied it, meanwhile
            now = env.now
            pool.now = now
            preempted = stats.preemptions
            batch = self.scheduler.schedule(self, now)
            preempted = stats.preemptions != preempted
            if not batch:
                if pool.pins and not self.running and not self.num_flying:
                    pool.unpin_oldest()          # KV held for idle sessions gives way to waiting requests
                    continue
                if self.num_flying:              # everything schedulable is in the pipeline
                    yield from self._sleep()
                    continue
                wake = self.scheduler.wake_at(self, now) if hasattr(self.scheduler, "wake_at") else None
                if wake is not None and wake > now:   # the policy holds its batch back until then (or an arrival)
                    yield from self._sleep(wake)
                    continue
                raise RuntimeError(f"replica {self.index}: nothing schedulable with {len(self.waiting)} waiting "
                                   f"and {len(self.running)} running at t={now}; this is a servesim bug")
            decode, pre_new, pre_cached = [], [], []
            shape = BatchShape(pre_new, pre_cached, decode)
            sampled = 0
            load_s, self.pending_s = self.pending_s, 0.0  # swap-outs of this schedule, then loads below
            for req, n in batch:
                if req.first_scheduled != req.first_scheduled:  # NaN: first time
                    req.first_scheduled = now
                c = req.num_computed
                left = req.prompt_tokens + req.num_output - c  # req.num_tokens - c
                if n == 1 and left == 1 and req.num_output:
                    decode.append(c)
                    if self._ids:
                        shape.decode_ids.append(req.id)
                else:
                    pre_new.append(n)
                    pre_cached.append(c)
                    if self._ids:
                        shape.prefill_ids.append(req.id)
                    if req.load_s:                       # KV loaded back from offload tiers before the step
                        load_s += req.load_s
                        if not req.lost:                 # (while recovering from a preemption: its cost)
                            req.kv_load_s += req.load_s
                        req.load_s = 0.0
                if n == left:
                    sampled += 1
            shape.num_sampled = sampled
            metrics.sample(self.index, now, len(self.waiting), self.num_running, pool.num_used)
            st = self.model.step_time(shape)
            dt = (st.seconds if self.pp == 1 else st.seconds / self.pp) + load_s  # until the first stage is free
            if self.slow != 1.0:
                dt *= self.slow
            prefill = sum(pre_new)
            stats.add_step(dt, st, prefill, len(decode), pool.num_used, load_s, self.pp, len(batch))
            if self.waiting:
                stats.blocked_s[self._blocker(prefill + len(decode), preempted)] += dt
            if metrics.trace is not None:
                metrics.trace.step(self.index, now, dt, prefill, len(decode), pool.num_used, len(self.waiting),
                                   self.num_running, st, load_s, self.pp)
            if self.pp == 1:
                epoch = self.epoch
                if not advance(env, now + dt, self.stop_time):   # (now + dt: as env.timeout(dt) computes it)
                    yield env.timeout(dt)
                    if self.epoch != epoch:              # it crashed during the step: nothing came of it
                        continue
                if self.cancelled:                       # given up during the step: their tokens are dropped
                    batch = [x for x in batch if not x[0].outcome]
                self._complete(batch, env.now)
                # cheap tests first: every request of the step sampled but at most one (mid-prompt: DecodeRun.plan
                # checks it is the newest), and a next step as long as this one would not already meet the next event
                if (self.fast_decode and sampled >= len(batch) - 1 and self.running and not self.cancelled
                        and env.now + dt < self.horizon() and self.scheduler.steady_decode(self)):
                    yield from self._decode_runs(epoch)
            else:
                self._launch(batch, now, dt)
                yield env.timeout(self.stage_free[0] - now)

    def _decode_runs(self, epoch: int):
        """Decode runs (sim/decode_run.py), one after another while each ends with a finish that leaves the
        batch steady: nothing else happened at its end instant, nothing was cancelled and the policy agrees."""
        env, pool = self.env, self.pool
        while True:
            run = DecodeRun.plan(self, min(self.horizon(), self.stop_time))
            if run is None:
                return
            if not advance(env, run.end, self.stop_time):
                self._run, self._run_end = run, at_time(env, run.end, COMPLETE)
                yield self._run_end             # moved earlier if an arrival cuts the run (add)
                if self.epoch != epoch:
                    return
                self._run = None
            run.commit(self)
            if self.check_invariants:
                pool.check(live=self.running)
            if not (run.finishes and self.running and not self.cancelled and env.peek() > env.now
                    and self.scheduler.steady_decode(self)):
                return

    def _blocker(self, tokens: int, preempted: bool) -> str:
        """What kept the head of the queue out of this step (attribution: what caps the batch)."""
        sched = self.scheduler
        if preempted:
            return "kv_blocks"
        if self.num_running >= getattr(sched, "max_num_seqs", float("inf")):
            return "max_num_seqs"
        if tokens >= getattr(sched, "budget", float("inf")):
            return "token_budget"
        if self.pool.blocks_needed(self.waiting[0].num_tokens) > self.pool.num_free:
            return "kv_blocks"
        return "policy"

    def sent(self, req) -> None:
        """req's KV has reached its decode replica: release the blocks it held here."""
        self.pool.now = self.env.now
        self.pool.free(req)
        if self._release:
            self._release(req.id)
        self.sending.remove(req)

    def _sleep(self, until: float | None = None):
        """Until add() or a landing micro-batch wakes the replica, or (given) the SCHEDULE phase of `until`."""
        wakeup = self._wakeup = self.env.event()
        if until is not None:
            def ring(_ev):
                if self._wakeup is wakeup and not wakeup.triggered:
                    wakeup.succeed()
            at_time(self.env, until, SCHEDULE).callbacks.append(ring)
        yield wakeup
        self._wakeup = None

    def _launch(self, batch, now: float, stage_s: float) -> None:
        """Send a micro-batch down the pipeline; its requests sit out until it leaves the last stage."""
        end = now
        for k in range(self.pp):
            end = max(end, self.stage_free[k]) + stage_s
            self.stage_free[k] = end
        members = {id(req) for req, _ in batch}
        self.running = [r for r in self.running if id(r) not in members]
        self.flying.append(batch)
        self.num_flying += len(batch)
        epoch = self.epoch
        at(self.env, end - now, COMPLETE).callbacks.append(lambda _ev: self._land(batch, epoch))

    def _land(self, batch, epoch: int) -> None:
        if self.epoch != epoch:                      # launched before a crash: lost with the replica
            return
        self._complete([x for x in batch if not x[0].outcome] if self.cancelled else batch, self.env.now)
        self.flying.remove(batch)
        self.num_flying -= len(batch)
        self.running.extend(req for req, _ in batch if not req.outcome and not req.handoff)
        self._wake()

    def _complete(self, batch, now: float) -> None:
        pool, itl = self.pool, self.metrics.itl
        pool.now = now
        sampled = 0
        finished = []
        gaps = []
        caching = pool.caching
        for req, n in batch:
            old = req.num_computed
            req.num_computed = old + n
            if caching:
                pool.register_full_blocks(req, old, old + n)
            if req.lost and old + n >= req.lost:           # its KV is back: the preemption's cost ends
                self._recovered(req, now)
            if old + n == req.prompt_tokens + req.num_output:     # req.num_tokens
                req.num_output += 1
                sampled += 1
                if req.num_output == 1:
                    req.first_token = now
                    if self.prefill_only and req.output_tokens > 1:
                        req.handoff = True           # its KV goes to a decode replica (cluster.handoff)
                        req.last_token = now
                        finished.append(req)
                        continue
                elif req.job < 0:                        # ITL is online traffic's (as the latency table)
                    gaps.append(now - req.last_token)
                req.last_token = now
                if req.num_output == req.output_tokens:
                    self._finish(req, now)
                    finished.append(req)
        itl.add_list(gaps, now)
        self._step_done(finished, sampled, now)

    def _complete_run(self, reqs: list, n: int, prev: float, now: float) -> None:
        """The end of a decode run's n steps (DecodeRun.commit has applied their blocks and metrics): each request
        has n more tokens, the last at now, the one before at prev (with n = 1, at its own last_token). As n calls
        of _complete would leave it, without the branches a decoding request cannot take."""
        pool = self.pool
        pool.now = now
        caching, cancelled = pool.caching, self.cancelled
        finished, gaps = [], []
        sampled, single = 0, n == 1
        for req in reqs:
            if cancelled and req.outcome:          # given up during the run: its last token is dropped
                req.num_computed += n - 1
                req.num_output += n - 1
                req.last_token = prev
                continue
            sampled += 1
            c = req.num_computed + n
            req.num_computed = c
            if caching:
                pool.register_full_blocks(req, c - 1, c)
            if req.lost and c >= req.lost:
                self._recovered(req, now)
            out = req.num_output = req.num_output + n
            if req.job < 0:                          # (as the run's steps, one after another, set last_token)
                gaps.append(now - (req.last_token if single else prev))
            req.last_token = now
            if out == req.output_tokens:
                self._finish(req, now)
                finished.append(req)
        self.metrics.itl.add_list(gaps, now)
        self._step_done(finished, sampled, now)

    def _recovered(self, req, now: float) -> None:
        d = now - req.preempted_at
        req.preempted_s += d
        if req.num_output == 0:
            req.preempted_ttft_s += d
        req.lost = 0

    def _finish(self, req, now: float) -> None:
        req.finish = now
        req.outcome = FINISHED
        if req.retain_key is not None:       # its session keeps the KV for its next turn
            self.pool.pin(req.retain_key, req)
        self.pool.free(req)
        if self._release:
            self._release(req.id)

    def _step_done(self, finished: list, sampled: int, now: float) -> None:
        """After a step's tokens: the finished (or handed-off) requests leave, tokens are counted."""
        pool = self.pool
        if finished:
            self.running = [r for r in self.running if r.outcome != FINISHED and not r.handoff]
            self.outstanding -= len(finished)
            if self.num_batch:
                self.num_batch -= sum(r.job >= 0 for r in finished)
            for req in finished:
                if req.handoff:
                    self.sending.append(req)
                    self.on_handoff(req, now)
                else:
                    self.on_done(req, now)
        self.metrics.on_tokens(now, sampled, self.index)
        if self.check_invariants:
            live = self.running + [req for b in self.flying for req, _ in b if req.outcome != FINISHED and not req.handoff]
            pool.check(live=live + self.sending)
            for r in live:
                assert len(r.blocks) >= math.ceil(r.num_computed / pool.block_size), r
            for r in self.waiting:
                assert not r.blocks and r.num_computed == 0, r
            assert self.outstanding == len(self.waiting) + len(live)
