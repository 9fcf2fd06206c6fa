import copy

import pytest

from servesim.sim.config import parse_config
from servesim.sim.report import build_report, request_table
from servesim.sim.run import simulate

BASE = {
    "name": "test",
    "seed": 1,
    "fleet": {"replicas": [{"gpu": "H100-SXM", "model": "meta-llama/Llama-3.1-8B"}]},
    "workload": {"kind": "synthetic", "num_requests": 200, "arrival": {"process": "poisson", "rate": 20.0},
                 "lengths": {"kind": "independent", "input": {"dist": "uniform", "low": 20, "high": 400},
                             "output": {"dist": "uniform", "low": 1, "high": 60}}},
    "output": {"plots": False},
    "sim": {"check_invariants": True},
}


def make_config(**overrides):
    """BASE with nested overrides given as dotted keys: make_config(**{"fleet.replicas": [...]})."""
    raw = copy.deepcopy(BASE)
    for key, value in overrides.items():
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return parse_config(raw)


def run_raw(raw, base_dir=None):
    cfg = parse_config(raw)
    res = simulate(cfg, base_dir)
    return res, request_table(res)


def run_fast_and_plain(raw):
    """[(result, table) with sim.fast_decode on, the same with it off]: the two paths must agree."""
    out = []
    for fast in (True, False):
        r = copy.deepcopy(raw)
        r.setdefault("sim", {})["fast_decode"] = fast
        out.append(run_raw(r))
    return out


@pytest.fixture
def base_raw():
    return copy.deepcopy(BASE)


__all__ = ["make_config", "run_raw", "run_fast_and_plain", "BASE", "build_report"]
