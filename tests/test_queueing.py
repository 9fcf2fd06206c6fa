"""Queueing theory on the simulator's output.

One replica serves one request at a time (max_num_seqs 1); every request is a single step of
constant duration D (one output token, linear model with only a base time), arrivals are Poisson:
an M/D/1 queue. Pollaczek-Khinchine gives the mean wait Wq = rho * D / (2 (1 - rho)).
"""
import numpy as np
import pytest

from conftest import BASE, run_raw
import copy

D, LAM, N = 1.0, 0.5, 100_000


@pytest.fixture(scope="module")
def md1():
    raw = copy.deepcopy(BASE)
    raw["seed"] = 7
    raw["sim"] = {"check_invariants": False}
    raw["fleet"]["replicas"][0]["perf_model"] = {"name": "linear", "base_s": D}
    raw["fleet"]["replicas"][0]["engine"] = {"max_num_seqs": 1}
    raw["workload"] = {"kind": "synthetic", "num_requests": N, "arrival": {"process": "poisson", "rate": LAM},
                       "lengths": {"kind": "independent", "input": {"dist": "fixed", "value": 16},
                                   "output": {"dist": "fixed", "value": 1}}}
    return run_raw(raw)


def test_md1_mean_wait_matches_pollaczek_khinchine(md1):
    _, df = md1
    rho = LAM * D
    wq_theory = rho * D / (2 * (1 - rho))            # 0.5 s
    wait = df["queue_s"].to_numpy()
    assert np.allclose(df["e2e_s"] - wait, D)          # service is exactly D
    # Waits are autocorrelated, so the standard error comes from batch means: 50 batches of 2,000
    # requests, each far longer than the queue's relaxation time (~ 1/(1-rho)^2 = 4 services).
    means = wait.reshape(50, -1).mean(axis=1)
    se = means.std(ddof=1) / np.sqrt(means.size)
    assert se < 0.02                                   # the test can detect a 10% error in Wq
    assert abs(wait.mean() - wq_theory) < 4 * se, (wait.mean(), wq_theory, se)


def test_littles_law_holds_on_the_output(md1):
    res, df = md1
    m = res.metrics
    T = df["finish_s"].max()
    # the engine's own time-integral of requests in the system (an instrument independent of the table)
    L = m.in_system_integral / T
    lam_hat = len(df) / T
    W = df["e2e_s"].mean()
    assert L == pytest.approx(lam_hat * W, rel=1e-9)
    # and the M/D/1 number in system, L = rho + rho^2 / (2 (1 - rho)) = 0.75, within sampling error
    rho = LAM * D
    assert L == pytest.approx(rho + rho**2 / (2 * (1 - rho)), rel=0.05)
