"""servesim sweep: points, the tidy table, resuming, failures recorded, random samples, Ray."""
import copy
import json

import pandas as pd
import pytest
import yaml

from conftest import BASE, run_raw
from servesim.experiments.sweep import load_sweep, points, run_sweep
from servesim.sim.errors import ConfigError

SMALL = copy.deepcopy(BASE)
SMALL["sim"] = {}
SMALL["workload"]["num_requests"] = 40
SMALL["fleet"]["replicas"][0]["count"] = 2


def _write(tmp_path, sweep: dict, name="sweep.yaml"):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(SMALL))
    p = tmp_path / name
    p.write_text(yaml.safe_dump({"base": "base.yaml", **sweep}))
    return p


GRID = {"grid": {"policies.routing.name": ["round_robin", "least_outstanding"], "workload.arrival.rate": [10.0, 30.0]},
        "seeds": [0, 1]}


def test_grid_times_seeds_gives_one_row_per_point_with_the_direct_run_metrics(tmp_path):
    table, ran = run_sweep(_write(tmp_path, GRID), tmp_path / "out", jobs=2, progress=False)
    assert ran == 8 and len(table) == 8
    assert set(table["status"]) == {"ok"}
    assert sorted(zip(table["policies.routing.name"], table["workload.arrival.rate"], table["seed"])) == sorted(
        (r, rate, s) for r in ("round_robin", "least_outstanding") for rate in (10.0, 30.0) for s in (0, 1))
    for col in ("latency_ms.ttft.p99", "latency_ms.tpot.p50", "throughput.requests_per_s", "cost.usd_per_1m_output_tokens",
                "requests.finished", "slo.attainment"):
        assert col in table.columns, col
    # a point's row holds exactly what a direct run of that config reports
    row = table[(table["policies.routing.name"] == "round_robin") & (table["workload.arrival.rate"] == 30.0)
                & (table["seed"] == 1)].iloc[0]
    raw = copy.deepcopy(SMALL)
    raw["policies"] = {"routing": {"name": "round_robin"}}
    raw["workload"]["arrival"]["rate"] = 30.0
    raw["seed"] = 1
    res, df = run_raw(raw)
    assert row["latency_ms.ttft.p99"] == pytest.approx(1000 * df["ttft_s"].dropna().quantile(0.99), rel=1e-12)
    assert row["requests.finished"] == (df["outcome"] == "finished").sum()
    # the parquet table is the same table
    pq = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert list(pq.columns) == list(table.columns) and len(pq) == 8
    assert json.loads((tmp_path / "out" / "points" / row["point"] / "point.json").read_text())["seed"] == 1
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 20_000


def test_whole_policy_sections_can_be_swept(tmp_path):
    sweep = {"grid": {"policies.batching": [{"name": "continuous"}, {"name": "sjf", "predictor": "noisy"}]}}
    table, ran = run_sweep(_write(tmp_path, sweep), tmp_path / "out", jobs=2, progress=False)
    assert ran == 2 and list(table["status"]) == ["ok", "ok"]
    assert list(table["policies.batching"]) == ['{"name": "continuous"}', '{"name": "sjf", "predictor": "noisy"}']
    assert pd.read_parquet(tmp_path / "out" / "results.parquet")["policies.batching"].tolist() == \
        list(table["policies.batching"])


def test_rerun_skips_finished_points_and_runs_only_missing_ones(tmp_path):
    spec = _write(tmp_path, GRID)
    first, ran = run_sweep(spec, tmp_path / "out", jobs=2, progress=False)
    again, ran2 = run_sweep(spec, tmp_path / "out", jobs=2, progress=False)
    assert ran2 == 0
    pd.testing.assert_frame_equal(first, again)
    # a point folder without its report (as a crash mid-write would leave under a temporary name) is redone
    victim = first["point"].iloc[3]
    (tmp_path / "out" / "points" / victim / "report.json").unlink()
    _, ran3 = run_sweep(spec, tmp_path / "out", jobs=2, progress=False)
    assert ran3 == 1
    # a grid that grows runs only its new points
    grown = copy.deepcopy(GRID)
    grown["grid"]["workload.arrival.rate"].append(50.0)
    _, ran4 = run_sweep(_write(tmp_path, grown), tmp_path / "out", jobs=2, progress=False)
    assert ran4 == 4


def test_a_failing_point_is_recorded_and_the_others_finish(tmp_path):
    spec = _write(tmp_path, {"grid": {"workload.arrival.rate": [10.0, -1.0, 20.0]}})
    table, ran = run_sweep(spec, tmp_path / "out", jobs=2, progress=False)
    assert ran == 3
    assert list(table["status"]) == ["ok", "error", "ok"]
    bad = table.iloc[1]
    assert "workload.arrival.rate" in bad["error"] and "greater than 0" in bad["error"]
    assert (tmp_path / "out" / "points" / f"{bad['point']}.error.txt").is_file()
    _, ran2 = run_sweep(spec, tmp_path / "out", jobs=2, progress=False)
    assert ran2 == 1                                     # only the failed point is retried


def test_random_samples_are_seeded_and_within_their_distributions(tmp_path):
    sweep = {"random": {"samples": 50, "params": {
        "workload.arrival.rate": {"uniform": [2.0, 8.0]},
        "fleet.replicas.0.engine.max_num_seqs": {"choice": [16, 32]},
        "fleet.replicas.0.count": {"randint": [1, 3]},
        "workload.num_requests": {"loguniform": [10, 1000]}}}}
    spec, base, _ = load_sweep(_write(tmp_path, sweep))
    pts = points(spec, base)
    assert len(pts) == 50 and len({p["id"] for p in pts}) == 50
    rates = [p["settings"]["workload.arrival.rate"] for p in pts]
    assert all(2.0 <= r <= 8.0 for r in rates)
    assert {p["settings"]["fleet.replicas.0.engine.max_num_seqs"] for p in pts} == {16, 32}
    assert {p["settings"]["fleet.replicas.0.count"] for p in pts} == {1, 2, 3}
    assert all(10 <= p["settings"]["workload.num_requests"] <= 1000 for p in pts)
    assert pts == points(*load_sweep(_write(tmp_path, sweep))[:2])          # same sample_seed, same points
    sweep["sample_seed"] = 1
    assert pts != points(*load_sweep(_write(tmp_path, sweep))[:2])


@pytest.mark.parametrize("sweep, message", [
    ({"grid": {"workload.arrival.rate": [1.0]}, "gird": {}}, "gird: unknown key"),
    ({"grid": {"workload.arrival.rate": []}}, "grid.workload.arrival.rate: empty list"),
    ({"random": {"samples": 3, "params": {"seed": {"uniform": [5, 1]}}}}, "low <= high"),
    ({"random": {"samples": 3, "params": {"seed": {"gauss": [0, 1]}}}}, "random.params.seed.gauss"),
])
def test_bad_sweep_files_are_named_errors(tmp_path, sweep, message):
    with pytest.raises(ConfigError, match="invalid sweep") as e:
        load_sweep(_write(tmp_path, sweep))
    assert message in str(e.value)


def test_a_missing_base_config_is_a_clear_error(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"base": "nope.yaml", "grid": {"seed": [1]}}))
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        run_sweep(p, tmp_path / "out", progress=False)


def test_the_ray_executor_gives_the_local_results(tmp_path):
    sweep = {"grid": {"workload.arrival.rate": [10.0, 30.0]}}
    local, _ = run_sweep(_write(tmp_path, sweep), tmp_path / "local", jobs=1, progress=False)
    remote, ran = run_sweep(_write(tmp_path, sweep), tmp_path / "ray", executor="ray", jobs=2, progress=False)
    assert ran == 2
    cols = [c for c in local.columns if c.startswith(("latency_ms.", "throughput.", "requests."))]
    pd.testing.assert_frame_equal(local[["point"] + cols], remote[["point"] + cols])


def test_servesim_run_of_a_comparison_file_runs_the_sweep(tmp_path):
    from typer.testing import CliRunner

    from servesim.sim.cli import app
    spec = _write(tmp_path, {"grid": {"policies.routing.name": ["round_robin", "least_outstanding"]}})
    out = CliRunner().invoke(app, ["run", str(spec), "-o", str(tmp_path / "cmp"), "--quiet"])
    assert out.exit_code == 0, out.output
    assert len(pd.read_csv(tmp_path / "cmp" / "results.csv")) == 2
    assert (tmp_path / "cmp" / "comparison.png").is_file()
    bad = CliRunner().invoke(app, ["run", str(spec), "--seed", "3"])
    assert bad.exit_code == 2 and "not to a sweep file" in bad.output
