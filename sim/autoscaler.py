"""Autoscaling one replica group: a controller that adds replicas (after a cold start) and drains them.

Each replica of the group is in one state:
  off       not running, not paid;
  starting  loading weights and starting the engine (cold start: weight bytes per GPU / load bandwidth +
            engine start-up), paid, not routed to;
  warm      loaded and idle in the warm pool, paid, not routed to: it becomes active at once;
  active    routed to, paid;
  draining  scaled down: no new requests, paid until its last request finishes (nothing is lost), then off.

Every interval_s the controller reads the metric over the active replicas and computes the desired count
as Kubernetes' HPA does, desired = ceil(current x metric / target), left alone while metric / target is
within 1 +- tolerance (concurrency, queue); for slo_attainment, one replica more while attainment is below
target and one fewer while it is met with an empty queue. Scale-up is immediate (replicas already starting
count as capacity, so a cold start is not paid twice); scale-down goes only to the largest count desired
over the last scale_down_cooldown_s (HPA's stabilization window, which keeps a load near a threshold from
flapping) and waits that long after any scaling. Scale-up reactivates a draining replica first, then a warm one (and refills the warm pool with a
cold start), then cold-starts an off one. Replicas of other groups are always active.
"""
from __future__ import annotations

import math

OFF, STARTING, WARM, ACTIVE, DRAINING = "off", "starting", "warm", "active", "draining"


class Autoscaler:
    def __init__(self, env, cluster, group: list, cfg, cold_start_s: float):
        self.env, self.cluster, self.cfg = env, cluster, cfg
        self.group = group                   # the scaled replicas
        self.cold_start_s = cold_start_s
        init = cfg.initial_replicas or cfg.min_replicas
        self.state = {r.index: (ACTIVE if k < init else WARM if k < init + cfg.warm_pool else OFF)
                      for k, r in enumerate(group)}
        self.paid_since = {r.index: 0.0 for r in group if self.state[r.index] != OFF}
        self.paid_s = {r.index: 0.0 for r in group}
        self.events: list[dict] = []
        self.timeline: list[tuple] = []      # (t, active, starting, warm, draining, metric)
        self.last_scale = -math.inf
        self._done = self._met = 0           # requests finished in the current interval, and meeting their SLO
        self.meets = None                    # callback(request) -> bool, for slo_attainment
        self._wants: list = []               # (t, desired) of recent evaluations: the stabilization window
        self._targets: dict = {}             # starting replica -> the state it starts into (active or warm)
        cluster.autoscaler = self
        self._refresh()
        env.process(self._loop())

    # --- states ------------------------------------------------------------------------------
    def count(self, state: str) -> int:
        return sum(1 for s in self.state.values() if s == state)

    def _refresh(self) -> None:
        """The cluster routes to active replicas only (other groups' replicas are always active)."""
        mine = set(self.state)
        self.cluster.set_routable([r for r in self.cluster.replicas
                                   if r.index not in mine or self.state[r.index] == ACTIVE])

    def _set(self, i: int, state: str, why: str) -> None:
        now = self.env.now
        old = self.state[i]
        self.state[i] = state
        if state == OFF and i in self.paid_since:
            self.paid_s[i] += now - self.paid_since.pop(i)
        elif state != OFF and i not in self.paid_since:
            self.paid_since[i] = now
        self.events.append({"t": now, "replica": i, "from": old, "to": state, "why": why})

    def close(self, end: float) -> dict:
        """Paid seconds of each scaled replica up to the end of the run."""
        for i, t in self.paid_since.items():
            self.paid_s[i] += end - t
        self.paid_since = {i: end for i in self.paid_since}
        return self.paid_s

    # --- hooks from the cluster ----------------------------------------------------------------
    def on_done(self, req) -> None:
        if req.job < 0:                      # batch jobs have deadlines, not SLOs: they do not steer scaling
            self._done += 1
            if self.meets is not None and self.meets(req):
                self._met += 1
        i = req.replica
        if self.state.get(i) == DRAINING and self.cluster.replicas[i].outstanding == 0:
            self._set(i, OFF, "drained")

    # --- the controller ------------------------------------------------------------------------
    def metric(self, active: list) -> float:
        m = self.cfg.metric
        if m == "concurrency":
            return sum(r.outstanding for r in active) / len(active)
        if m == "queue":
            return sum(r.num_waiting for r in active) / len(active)
        return self._met / self._done if self._done else 1.0

    def desired(self, active: list, value: float) -> int:
        cur = len(active) + self.count(STARTING)
        c = self.cfg
        if c.metric == "slo_attainment":
            if value < c.target:
                want = cur + 1
            elif not any(r.num_waiting for r in active):
                want = cur - 1
            else:
                want = cur
        else:
            ratio = value / c.target
            want = cur if abs(ratio - 1) <= c.tolerance else math.ceil(len(active) * ratio)
        return max(c.min_replicas, min(len(self.group), want))

    def _loop(self):
        env, c = self.env, self.cfg
        while True:
            yield env.timeout(c.interval_s)
            active = [r for r in self.group if self.state[r.index] == ACTIVE]
            value = self.metric(active)
            self._done = self._met = 0
            want = self.desired(active, value)
            cur = len(active) + self.count(STARTING)
            now = env.now
            self._wants = [(t, w) for t, w in self._wants if t > now - c.scale_down_cooldown_s] + [(now, want)]
            if want > cur:
                self._scale_up(want - cur, value)
            else:
                down = max(w for _, w in self._wants)
                if down < len(active) and now - self.last_scale >= c.scale_down_cooldown_s:
                    self._scale_down(len(active) - down, value)
            self.timeline.append((now, self.count(ACTIVE), self.count(STARTING), self.count(WARM),
                                  self.count(DRAINING), value))
            if self.cluster.idle_forever():
                return

    def _scale_up(self, n: int, value: float) -> None:
        why = f"{self.cfg.metric} {value:.3g} vs target {self.cfg.target:g}"
        self.last_scale = self.env.now
        for want in (DRAINING, WARM, OFF):
            for r in self.group:
                if n and self.state[r.index] == want:
                    n -= 1
                    if want == OFF:
                        self._start(r.index, ACTIVE, why)
                    else:
                        self._set(r.index, ACTIVE, why)
                        if want == WARM:
                            self._refill()
        self._refresh()

    def _refill(self) -> None:
        """Keep the warm pool at its size: cold-start an off replica into it."""
        if self.count(WARM) + sum(1 for t in self._targets.values() if t == WARM) >= self.cfg.warm_pool:
            return
        for r in self.group:
            if self.state[r.index] == OFF:
                self._start(r.index, WARM, "refill warm pool")
                return

    def _start(self, i: int, target: str, why: str) -> None:
        self._set(i, STARTING, why)
        self._targets[i] = target

        def ready(_ev, i=i):
            if self.state[i] == STARTING:
                self._set(i, self._targets.pop(i), "cold start done")
                self._refresh()
        self.env.timeout(self.cold_start_s).callbacks.append(ready)

    def _scale_down(self, n: int, value: float) -> None:
        why = f"{self.cfg.metric} {value:.3g} vs target {self.cfg.target:g}"
        self.last_scale = self.env.now
        active = sorted((r for r in self.group if self.state[r.index] == ACTIVE),
                        key=lambda r: (r.outstanding, -r.index))
        for r in active[:n]:
            if r.outstanding == 0:
                self._set(r.index, OFF, why)
            else:
                self._set(r.index, DRAINING, why)
        self._refresh()

    def report(self, end: float) -> dict:
        paid = self.close(end)
        return {"events": self.events, "replica_seconds": sum(paid.values()),
                "timeline": [dict(zip(("t", "active", "starting", "warm", "draining", "metric"), row))
                             for row in self.timeline],
                "cold_start_s": self.cold_start_s}
