"""Synthetic arrival processes and length distributions, vectorized over a seeded numpy Generator."""
from __future__ import annotations

import numpy as np


def interarrivals(arrival, n: int, rng: np.random.Generator) -> np.ndarray:
    p = arrival.process
    if p == "poisson":
        return rng.exponential(1.0 / arrival.rate, n)
    if p == "gamma":
        k = 1.0 / arrival.cv**2            # shape; CV of a gamma variate is 1/sqrt(k)
        return rng.gamma(k, 1.0 / (arrival.rate * k), n)
    if p == "constant":
        return np.full(n, 1.0 / arrival.rate)
    if p == "all_at_once":
        return np.zeros(n)
    raise ValueError(p)


def diurnal_times(arrival, num_requests: int | None, duration_s: float | None, rng) -> np.ndarray:
    """Inhomogeneous Poisson arrivals by thinning (Lewis and Shedler, 1979): candidates at the peak rate,
    each kept with probability rate(t) / peak."""
    peak = arrival.rate * (1 + arrival.amplitude)
    out, last = [], 0.0
    while True:
        c = last + np.cumsum(rng.exponential(1.0 / peak, 4096))
        lam = arrival.rate * (1 - arrival.amplitude * np.cos(2 * np.pi * c / arrival.period_s))
        out.append(c[rng.random(len(c)) * peak < lam])
        last = c[-1]
        n = sum(len(x) for x in out)
        if (num_requests is not None and n >= num_requests) or (duration_s is not None and last >= duration_s):
            break
    t = np.concatenate(out)
    if num_requests is not None:
        t = t[:num_requests]
    return t if duration_s is None else t[t < duration_s]


def arrival_times(arrival, num_requests: int | None, duration_s: float | None, rng) -> np.ndarray:
    """Open-loop arrival times; the first request arrives at t=0 (then gaps follow), except diurnal ones."""
    if arrival.process == "diurnal":
        return diurnal_times(arrival, num_requests, duration_s, rng)
    if num_requests is not None:
        t = np.concatenate([[0.0], np.cumsum(interarrivals(arrival, num_requests - 1, rng))])
        return t if duration_s is None else t[t < duration_s]
    chunks, last = [np.zeros(1)], 0.0
    mean_gap = 1.0 / arrival.rate
    while last < duration_s:
        n = int(max(1024, 1.2 * (duration_s - last) / mean_gap))
        c = last + np.cumsum(interarrivals(arrival, n, rng))
        chunks.append(c)
        last = c[-1]
    t = np.concatenate(chunks)
    return t[t < duration_s]


def sample_lengths(dist, n: int, rng: np.random.Generator) -> np.ndarray:
    d = dist.dist
    if d == "fixed":
        return np.full(n, dist.value, dtype=np.int64)
    if d == "uniform":
        return rng.integers(dist.low, dist.high + 1, n, dtype=np.int64)
    if d == "lognormal":
        x = np.rint(dist.median * np.exp(dist.sigma * rng.standard_normal(n)))
        return np.clip(x, dist.min, dist.max if dist.max is not None else np.inf).astype(np.int64)
    raise ValueError(d)
