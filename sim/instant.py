"""Explicit ordering of events that fall on the same simulated instant.

SimPy orders events by (time, priority, insertion). Every replica step ends with a NORMAL-priority
timeout, so at one instant t servesim processes, in this order:
  1. COMPLETE: steps ending at t (tokens, finishes, freed KV blocks) and what reacts to them
     directly (a closed-loop client sending its next request);
  2. ARRIVE:   trace and generator arrivals at t (admission and routing see the state after 1);
  3. SCHEDULE: replicas form their next batch (they see every request that arrived at t).
"""
from __future__ import annotations

from heapq import heappush

import simpy
from simpy.core import NORMAL

COMPLETE = NORMAL
ARRIVE = NORMAL + 1
SCHEDULE = NORMAL + 2


def at(env: simpy.Environment, delay: float, phase: int) -> simpy.Event:
    """A timeout that fires after `delay` in the given phase of its instant."""
    ev = simpy.Event(env)
    ev._ok = True          # as simpy.Timeout does: a pre-triggered event, scheduled with our priority
    ev._value = None
    env.schedule(ev, phase, delay)
    return ev


def at_time(env: simpy.Environment, t: float, phase: int) -> simpy.Event:
    """An event at absolute time t >= now in the given phase. A run of steps whose end times were summed
    one by one, as successive timeouts would have, lands exactly there (now + (t - now) could round)."""
    ev = simpy.Event(env)
    ev._ok = True
    ev._value = None
    heappush(env._queue, (t, phase, next(env._eid), ev))
    return ev


def move(env: simpy.Environment, ev: simpy.Event, t: float, phase: int) -> simpy.Event:
    """Reschedule a pending at/at_time event to fire at t (>= now) instead: its waiters move to a new event
    and the old one fires with nobody waiting (SimPy cannot take an event out of its queue)."""
    new = at_time(env, t, phase)
    new.callbacks, ev.callbacks = ev.callbacks, []
    return new


def advance(env: simpy.Environment, t: float, limit: float) -> bool:
    """Move the clock to t (> now) without an event, when nothing is scheduled before t nor at t: a process that
    would wait on a timeout to t is then the only thing to run until t, so skipping the event's round trip
    through the queue changes nothing but speed. False: something comes first, or t is at or past the run's
    stop time `limit` (an event there never fires); wait on an event as usual."""
    if t < env.peek() and t < limit:   # strictly: at t, events keep their phase order
        env._now = t
        return True
    return False
