"""servesim plan: the replica-count search, the plan table, what-ifs and the Pareto front."""
import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from servesim.experiments.plan import evaluate, load_plan, pareto_front, run_plan, search
from servesim.hwmodels.catalog import get_gpu
from servesim.sim.errors import ConfigError


@pytest.mark.parametrize("max_n", [1, 7, 40])
def test_search_finds_the_threshold_of_any_monotone_predicate_in_logarithmic_steps(max_n):
    for t in range(1, max_n + 2):
        n, tried = search(lambda k: k >= t, max_n)
        assert n == (t if t <= max_n else None)
        assert len(tried) == len(set(tried))                     # nothing evaluated twice
        assert len(tried) <= 2 * math.ceil(math.log2(max_n)) + 2


WORKLOAD = {"kind": "synthetic", "num_requests": 300, "arrival": {"process": "poisson", "rate": 60.0},
            "lengths": {"kind": "independent", "input": {"dist": "uniform", "low": 200, "high": 2000},
                        "output": {"dist": "uniform", "low": 10, "high": 100}}}
PLAN = {"name": "t", "workload": WORKLOAD, "targets": {"attainment": 0.95, "ttft_ms": 400, "tpot_ms": 40},
        "max_replicas": 8,
        "candidates": [{"name": "h100", "gpu": "H100-SXM", "model": "meta-llama/Llama-3.1-8B"},
                       {"name": "a100", "gpu": "A100-80GB-SXM", "model": "meta-llama/Llama-3.1-8B"}]}


def _write(tmp_path, plan):
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump(plan))
    return p


def test_plan_matches_brute_force_and_prices_the_fleet(tmp_path):
    table, evaluated = run_plan(_write(tmp_path, PLAN), tmp_path / "out", jobs=1)
    _, configs, base_dir = load_plan(_write(tmp_path, PLAN))
    for raw, name in zip(configs, ("h100", "a100")):
        brute = [evaluate(raw, str(base_dir), n) for n in range(1, 9)]
        meets = [e["attainment"] >= 0.95 for e in brute]
        assert meets == sorted(meets)                              # monotone here, as the search assumes
        row = table[table["candidate"] == name].iloc[0]
        assert row["replicas"] == meets.index(True) + 1
        assert row["evaluations"] < 8
        e = brute[int(row["replicas"]) - 1]
        assert row["attainment"] == e["attainment"] and row["ttft_p99_ms"] == e["ttft_p99_ms"]
        gpu = "H100-SXM" if name == "h100" else "A100-80GB-SXM"
        assert row["usd_per_hour"] == pytest.approx(row["replicas"] * get_gpu(gpu).usd_per_hour, rel=1e-9)
    assert list(table["usd_per_hour"]) == sorted(table["usd_per_hour"])
    assert table["replicas"].min() >= 2                              # the workload needs more than one GPU
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 10_000
    assert set(evaluated["candidate"]) == {"h100", "a100"}
    assert len(pd.read_csv(tmp_path / "out" / "plan.csv")) == 2


def test_what_if_double_rate_needs_at_least_as_many_replicas(tmp_path):
    plan = dict(PLAN, candidates=PLAN["candidates"][:1])
    base, _ = run_plan(_write(tmp_path, plan), tmp_path / "a", jobs=1)
    more, _ = run_plan(_write(tmp_path, plan), tmp_path / "b", jobs=1, rate_scale=2.0)
    assert more["replicas"].iloc[0] > base["replicas"].iloc[0]


def test_a_target_no_count_meets_is_reported_not_hidden(tmp_path):
    plan = dict(PLAN, candidates=PLAN["candidates"][:1], max_replicas=3, targets={"ttft_ms": 1, "attainment": 1.0})
    table, evaluated = run_plan(_write(tmp_path, plan), tmp_path / "out", jobs=1)
    assert not table["meets"].iloc[0] and pd.isna(table["replicas"].iloc[0])
    assert list(evaluated["replicas"]) == [1, 2, 3]


@pytest.mark.parametrize("change, message", [
    ({"candidates": [{"name": "x", "gpu": "H100-SXM", "model": "meta-llama/Llama-3.1-8B", "count": 2}]},
     "no count here"),
    ({"targets": {"attainment": 0.9}}, "at least one of ttft_ms"),
    ({"candidates": [{"name": "x", "gpu": "H100-SXMM", "model": "meta-llama/Llama-3.1-8B"}]}, "unknown gpu 'H100-SXMM'"),
    ({"workload": None}, "no workload"),
])
def test_bad_plans_are_named_errors(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        run_plan(_write(tmp_path, {**PLAN, **change}), tmp_path / "out", jobs=1)


def test_pareto_front_keeps_only_undominated_fleets_that_meet_the_targets():
    df = pd.DataFrame({"usd_per_hour": [1, 2, 2, 3, 4, 0.5], "ttft_p99_ms": [900, 500, 700, 600, 100, 50],
                       "meets": [True, True, True, True, True, False]})
    assert list(pareto_front(df).index) == [0, 1, 4]


def test_a_stated_confidence_asks_the_attainments_lower_bound_to_meet_the_target(tmp_path):
    plan = dict(PLAN, candidates=PLAN["candidates"][:1])
    point, _ = run_plan(_write(tmp_path, plan), tmp_path / "a", jobs=1)
    sure = dict(plan, targets={**PLAN["targets"], "confidence": 0.95})
    conf, evaluated = run_plan(_write(tmp_path, sure), tmp_path / "b", jobs=1)
    # 2 H100s reach 97% attainment (the point value meets 95%) but its 95% lower bound is 94.1%: 3 are needed
    assert (point.loc[0, "replicas"], conf.loc[0, "replicas"]) == (2, 3)
    # every fleet judged by its lower bound: meets exactly when attainment_low >= the target, and the bound is
    # below the point value
    assert (evaluated["meets"] == (evaluated["attainment_low"] >= 0.95)).all()
    assert (evaluated["attainment_low"] <= evaluated["attainment"] + 1e-12).all()
    two = evaluated[evaluated["replicas"] == 2].iloc[0]
    assert two["attainment"] == pytest.approx(0.97) and two["attainment_low"] < 0.95 and not two["meets"]


def test_model_error_widens_the_lower_bound_by_the_closed_form(tmp_path):
    # the lower bound with the step-time model's error: point - sqrt(workload half^2 + model half^2), the model's
    # half t(R, one-sided) x rms of the perturbed runs' attainment around the point
    from servesim.experiments.plan import evaluate, load_plan
    from servesim.sim.uncertainty import model_error_runs, model_half
    sure = dict(PLAN, candidates=PLAN["candidates"][:1], targets={**PLAN["targets"], "confidence": 0.95,
                                                                  "model_error_runs": 4})
    _, raws, base = load_plan(_write(tmp_path, sure))
    e = evaluate(raws[0], str(base), 2, 0.95, 4)
    assert e["attainment_low"] < e["attainment_low_workload"] < e["attainment"]
    from servesim.sim.config import parse_config
    raw = copy.deepcopy(raws[0])
    raw["fleet"]["replicas"][0]["count"] = 2
    xs = [v["slo.attainment"] for v in model_error_runs(parse_config(raw), Path(base), 4, workers=1)["values"]]
    hm = model_half(e["attainment"], xs, 0.95)
    assert hm > 0
    assert e["attainment_low"] == pytest.approx(e["attainment"] - np.hypot(e["attainment"] - e["attainment_low_workload"],
                                                                           hm), rel=1e-12)
    bad = dict(PLAN, targets={**PLAN["targets"], "model_error_runs": 4})
    with pytest.raises(ConfigError, match="give confidence too"):
        load_plan(_write(tmp_path, bad))
