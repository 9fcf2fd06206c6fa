"""Every example config under experiments/configs (and every point of every sweep) is valid and builds: its
GPUs, models, traces and named models resolve. Running them is the demo's and the notes' job; this keeps them
from rotting when the config schema changes."""
from pathlib import Path

import pytest
import simpy

from servesim.experiments.sweep import load_sweep, point_config, points
from servesim.sim.config import load_config, parse_config
from servesim.sim.metrics import Metrics
from servesim.sim.run import build

CONFIGS = Path(__file__).parent.parent / "experiments" / "configs"
EXAMPLES = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("sweeps", "plans"))
SWEEPS = sorted((CONFIGS / "sweeps").glob("*.yaml"))


def _build(cfg, base_dir):
    env = simpy.Environment()
    metrics = Metrics(sum(g.count for g in cfg.fleet.replicas), cfg.output.sample_interval_s)
    cluster, replicas, infos, workload = build(cfg, base_dir, env, metrics)
    assert len(replicas) == sum(g.count for g in cfg.fleet.replicas)
    assert len(workload) > 0 or workload.conversations or workload.concurrency


def test_there_are_examples():
    names = {p.stem for p in EXAMPLES}
    assert {"quickstart", "batch_jobs", "multi_model", "disaggregated", "autoscaling_diurnal",
            "faults_crash"} <= names
    assert {"batch_fill", "pd_ratio", "crash_spares"} <= {p.stem for p in SWEEPS}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_example_config_builds(path):
    cfg, base_dir = load_config(path)
    _build(cfg, base_dir)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_point_is_a_valid_config(path):
    spec, base_raw, base_dir = load_sweep(path)
    pts = points(spec, base_raw)
    assert pts
    for p in pts:
        parse_config(point_config(base_raw, p["settings"], p["seed"]), f"{path.name} point {p['settings']}")
