"""`servesim sweep`: one base config, a grid or random sample over any of its keys, times seeds.

A sweep file:

    base: ../quickstart.yaml          # a config file (relative to the sweep file) or an inline mapping
    grid:                             # every combination of these values
      policies.routing.name: [round_robin, least_outstanding]
      workload.arrival.rate: [2.0, 4.0]
    random:                           # and/or: samples drawn from distributions (seeded by sample_seed)
      samples: 8
      params:
        fleet.replicas.0.engine.max_num_seqs: {choice: [64, 128, 256]}
        workload.arrival.rate: {uniform: [1.0, 6.0]}       # also loguniform, randint (inclusive)
    seeds: [0, 1, 2]                  # default: the base config's seed

Each point runs in its own folder, points/<id>/, where <id> is a hash of its settings: re-running the
sweep skips points whose folder is complete (a point is written to a temporary folder and renamed when
done), and a sweep whose grid grows runs only the new points. A point that fails is recorded with its
error (points/<id>.error.txt) and in the table; the others go on; re-running retries it. The results
table (results.csv and results.parquet) has one row per point: its swept keys, seed, status and every
scalar of its report.json as a dotted column.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from servesim.sim.config import load_base, load_raw, parse_config, parse_spec, set_path
from servesim.sim.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RandomSpec(_Strict):
    samples: int = Field(gt=0)
    params: dict[str, dict[Literal["uniform", "loguniform", "randint", "choice"], list]]

    @model_validator(mode="after")
    def _one_distribution_each(self):
        for key, dist in self.params.items():
            if len(dist) != 1:
                raise ValueError(f"random.params.{key}: give one distribution (uniform, loguniform, randint or choice)")
            (kind, args), = dist.items()
            if kind == "choice":
                if not args:
                    raise ValueError(f"random.params.{key}.choice: empty list")
            elif len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or args[0] > args[1]:
                raise ValueError(f"random.params.{key}.{kind}: expected [low, high] numbers with low <= high")
            elif kind == "loguniform" and args[0] <= 0:
                raise ValueError(f"random.params.{key}.loguniform: bounds must be positive")
        return self


class SweepSpec(_Strict):
    name: str = "sweep"
    base: Union[str, dict]
    grid: dict[str, list] = {}
    random: Optional[RandomSpec] = None
    sample_seed: int = 0
    seeds: Optional[list[int]] = None

    @model_validator(mode="after")
    def _something_to_sweep(self):
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{key}: empty list of values")
        if self.random and set(self.random.params) & set(self.grid):
            raise ValueError(f"keys both in grid and random: {sorted(set(self.random.params) & set(self.grid))}")
        return self


def load_sweep(path: Path) -> tuple[SweepSpec, dict, Path]:
    """The sweep, its base config's raw mapping, and the folder relative paths in the base resolve from."""
    spec = parse_spec(SweepSpec, load_raw(path), path, "sweep")
    base_raw, base_dir = load_base(spec.base, path)
    return spec, base_raw, base_dir


def points(spec: SweepSpec, base_raw: dict) -> list[dict]:
    """Every point of the sweep: {"settings": {key: value}, "seed": int, "id": str}, in a fixed order."""
    keys = list(spec.grid)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*spec.grid.values())]
    if spec.random:
        rng = np.random.default_rng(spec.sample_seed)
        samples = []
        for _ in range(spec.random.samples):
            sample = {}
            for key, dist in spec.random.params.items():
                (kind, args), = dist.items()
                if kind == "uniform":
                    sample[key] = float(rng.uniform(args[0], args[1]))
                elif kind == "loguniform":
                    sample[key] = float(np.exp(rng.uniform(np.log(args[0]), np.log(args[1]))))
                elif kind == "randint":
                    sample[key] = int(rng.integers(args[0], args[1], endpoint=True))
                else:
                    sample[key] = args[int(rng.integers(len(args)))]
            samples.append(sample)
        combos = [{**c, **s} for c in combos for s in samples]
    seeds = spec.seeds if spec.seeds is not None else [int(base_raw.get("seed", 0))]
    out = []
    for settings in combos:
        for seed in seeds:
            key = json.dumps({"settings": settings, "seed": seed, "base": base_raw}, sort_keys=True, default=str)
            out.append({"settings": settings, "seed": seed, "id": hashlib.sha1(key.encode()).hexdigest()[:12]})
    return out


def point_config(base_raw: dict, settings: dict, seed: int) -> dict:
    raw = copy.deepcopy(base_raw)
    for key, value in settings.items():
        set_path(raw, key, value)
    raw["seed"] = seed
    return raw


def run_point(base_raw: dict, base_dir: str, settings: dict, seed: int, folder: str, plots: bool) -> dict:
    """Simulate one point into `folder` (atomically); returns {"status": "ok"} or {"status": "error", ...}.
    Runs in a worker process (local pool or Ray), so it takes and returns plain data."""
    from servesim.sim.report import write_outputs
    from servesim.sim.run import simulate

    final = Path(folder)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    error_file = final.with_name(final.name + ".error.txt")
    try:
        cfg = parse_config(point_config(base_raw, settings, seed), f"point {final.name}")
        result = simulate(cfg, Path(base_dir))
        shutil.rmtree(tmp, ignore_errors=True)
        write_outputs(result, tmp, plots=plots and cfg.output.plots)
        (tmp / "point.json").write_text(json.dumps({"settings": settings, "seed": seed}, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        error_file.unlink(missing_ok=True)
        return {"status": "ok"}
    except Exception as e:  # a failing point is recorded, the sweep goes on
        shutil.rmtree(tmp, ignore_errors=True)
        msg = " ".join(f"{type(e).__name__}: {e}".split())       # one line for the table
        error_file.write_text(msg + "\n\n" + traceback.format_exc())
        return {"status": "error", "error": msg}


def flatten(d: dict, prefix: str = "") -> dict:
    """Scalar leaves of a nested mapping as dotted keys (lists are left out: per-replica detail)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif not isinstance(v, list):
            out[key] = v
    return out


def _done(folder: Path) -> bool:
    return (folder / "report.json").is_file()


def run_sweep(path: Path, out: Path, *, executor: str = "local", jobs: Optional[int] = None,
              address: Optional[str] = None, plots: bool = False, progress: bool = True) -> tuple[pd.DataFrame, int]:
    """Run the points not yet done; return the whole results table and how many points ran now."""
    spec, base_raw, base_dir = load_sweep(path)
    parse_config(point_config(base_raw, {}, int(base_raw.get("seed", 0))), str(path) + ": base")  # fail early
    pts = points(spec, base_raw)
    out = Path(out)
    (out / "points").mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
    todo = [p for p in pts if not _done(out / "points" / p["id"])]
    args = [(base_raw, str(base_dir), p["settings"], p["seed"], str(out / "points" / p["id"]), plots) for p in todo]
    outcomes: dict[str, dict] = {}
    if todo:
        run = _run_ray if executor == "ray" else _run_local
        with _Bar(len(pts), len(pts) - len(todo), spec.name, progress) as bar:
            for p, res in zip(todo, run(args, jobs, address, bar)):
                outcomes[p["id"]] = res
    table = results_table(pts, out, list(spec.grid) + (list(spec.random.params) if spec.random else []))
    table.to_csv(out / "results.csv", index=False)
    table.to_parquet(out / "results.parquet", index=False)
    comparison_plot(table, list(spec.grid), out / "comparison.png")
    return table, len(todo)


def results_table(pts: list[dict], out: Path, keys: list[str]) -> pd.DataFrame:
    rows = []
    for p in pts:
        folder = out / "points" / p["id"]
        row: dict[str, Any] = {"point": p["id"], **{k: _cell(p["settings"].get(k)) for k in keys}, "seed": p["seed"]}
        if _done(folder):
            row.update(status="ok", error="")
            row.update(flatten(json.loads((folder / "report.json").read_text())))
        else:
            err = folder.with_name(folder.name + ".error.txt")
            row.update(status="error" if err.is_file() else "missing",
                       error=err.read_text().split("\n", 1)[0] if err.is_file() else "")
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(v):
    """A swept value as a table cell: scalars as they are, sections (e.g. a whole routing policy) as JSON."""
    return v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v, sort_keys=True)


COMPARED = (("latency_ms.ttft.p99", "p99 TTFT (ms)"), ("latency_ms.tpot.p99", "p99 TPOT (ms)"),
            ("slo.attainment", "SLO attainment"), ("throughput.output_tokens_per_s", "output tokens/s"),
            ("prefix_cache.hit_rate", "prefix-cache hit rate"), ("cost.usd_per_1m_output_tokens", "$ per 1M output tokens"))


def _short(key: str, v) -> str:
    """A bar label: `rate_scale=2.0`; a policy section as `priority(priorities={...})`; a list of named
    sections (replica groups) as `prefill x2 + decode x2`."""
    if isinstance(v, str) and v.startswith("[{"):
        items = json.loads(v)
        if all(isinstance(d, dict) and "name" in d for d in items):
            return " + ".join(f"{d['name']} x{d.get('count', 1)}" for d in items)
    if isinstance(v, str) and v.startswith("{"):
        d = json.loads(v)
        if "name" in d:
            rest = ", ".join(f"{k}={json.dumps(x)}" for k, x in d.items() if k != "name")
            return f"{d['name']}({rest})" if rest else str(d["name"])
    return f"{key.split('.')[-1]}={v}"


def comparison_plot(table: pd.DataFrame, keys: list[str], path: Path) -> None:
    """One bar per setting (mean over seeds, error bar: min..max) for each headline metric."""
    from servesim.sim.plots import plt, save
    ok = table[table["status"] == "ok"]
    if ok.empty:
        return
    label = ok[keys].agg(lambda r: ", ".join(_short(k, v) for k, v in zip(keys, r)), axis=1) \
        if keys else pd.Series("base", index=ok.index)
    metrics = [(c, t) for c, t in COMPARED if c in ok and ok[c].notna().any()]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6, 0.6 * label.nunique() + 3), 2.2 * len(metrics)),
                             squeeze=False)
    groups = ok.assign(_label=label).groupby("_label", sort=False)
    names = list(groups.groups)
    for ax, (col, title) in zip(axes[:, 0], metrics):
        g = groups[col]
        mean, lo, hi = g.mean(), g.min(), g.max()
        ax.bar(range(len(names)), mean[names], yerr=[mean[names] - lo[names], hi[names] - mean[names]], capsize=3)
        ax.set_ylabel(title, fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names if ax is axes[-1, 0] else [], rotation=30, ha="right", fontsize=7)
    save(fig, path, "sweep comparison (bars: mean over seeds; whiskers: min..max)")


def _run_local(args, jobs, address, bar):
    from concurrent.futures import ProcessPoolExecutor, as_completed
    jobs = jobs or os.cpu_count() or 1
    results = [None] * len(args)
    with ProcessPoolExecutor(max_workers=min(jobs, len(args))) as pool:
        futures = {pool.submit(run_point, *a): i for i, a in enumerate(args)}
        for f in as_completed(futures):
            results[futures[f]] = f.result()
            bar.advance(results[futures[f]])
    return results


def _run_ray(args, jobs, address, bar):
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'servesim[ray]'") from None
    started = not ray.is_initialized()
    if started:
        # workers import servesim from this environment; a cluster's nodes must have it installed too
        ray.init(address=address, num_cpus=None if address else (jobs or os.cpu_count()),
                 include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        task = ray.remote(num_cpus=1)(run_point)
        refs = [task.remote(*a) for a in args]
        index = {r: i for i, r in enumerate(refs)}
        results = [None] * len(args)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for r in ready:
                results[index[r]] = ray.get(r)
                bar.advance(results[index[r]])
        return results
    finally:
        if started:
            ray.shutdown()


class _Bar:
    """Points done and the ETA on a terminal; nothing otherwise."""

    def __init__(self, total: int, done: int, name: str, show: bool):
        self.show = show and sys.stderr.isatty()
        self.total, self.done, self.name, self.failed = total, done, name, 0

    def __enter__(self):
        if self.show:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.name, total=self.total, completed=self.done, info="")
        return self

    def advance(self, res: dict) -> None:
        self.failed += res["status"] != "ok"
        if self.show:
            self.bar.update(self.task, advance=1, info=f"failed {self.failed}" if self.failed else "")

    def __exit__(self, *exc):
        if self.show:
            self.bar.__exit__(*exc)
