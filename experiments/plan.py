"""`servesim plan`: the cheapest fleet of each candidate that meets the SLO targets on a workload.

A plan file:

    base: quickstart.yaml            # optional: policies, cost, sim, output... (and a default workload)
    workload: {...}                  # the workload section (else the base's)
    targets: {attainment: 0.99, ttft_ms: 2000, tpot_ms: 50}     # e2e_ms too; at least one latency
    # targets.confidence: 0.95 -> the attainment's one-sided 95% lower bound must reach it, not the point value;
    # targets.model_error_runs: 8 -> that bound also counts the step-time model's error (8 perturbed runs each)
    max_replicas: 64
    candidates:                      # replica groups without `count`, as under fleet.replicas
      - {name: h100-tp1, gpu: H100-SXM, model: meta-llama/Llama-3.1-8B}
      - {name: a100-tp2, gpu: A100-80GB-SXM, model: meta-llama/Llama-3.1-8B, tensor_parallel_size: 2}

For each candidate the fewest replicas meeting the targets is searched, not enumerated: counts double
from 1 until one meets them, then a bisection between the last miss and the first hit (SLO attainment
grows with the replica count; a test checks the search against brute force). Each evaluated fleet is
one simulation. The table is sorted by $/hour; the plot shows $/hour against p99 TTFT for every fleet
evaluated, the ones meeting the targets marked and their Pareto front drawn.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from servesim.sim.config import load_base, load_raw, parse_config, parse_spec
from servesim.sim.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Targets(_Strict):
    attainment: float = Field(0.99, gt=0, le=1, description="fraction of requests that must meet every latency")
    ttft_ms: Optional[float] = Field(None, gt=0)
    tpot_ms: Optional[float] = Field(None, gt=0)
    e2e_ms: Optional[float] = Field(None, gt=0)
    confidence: Optional[float] = Field(None, gt=0.5, lt=1, description="meet the attainment with this confidence: "
                                        "the one-sided lower bound of its interval (sim/intervals.py), not the point "
                                        "value, must reach it")
    model_error_runs: int = Field(0, ge=0, description="with confidence: runs of each fleet with the roofline's op "
                                  "times perturbed (sim/uncertainty.py), so the lower bound counts the step-time "
                                  "model's error too; 0: workload randomness only")

    @model_validator(mode="after")
    def _some_latency(self):
        if self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None:
            raise ValueError("give at least one of ttft_ms, tpot_ms, e2e_ms")
        if self.model_error_runs and self.confidence is None:
            raise ValueError("model_error_runs widens the attainment's lower bound: give confidence too")
        return self


class PlanSpec(_Strict):
    name: str = "plan"
    base: Union[str, dict, None] = None
    workload: Optional[dict] = None
    targets: Targets
    max_replicas: int = Field(64, gt=0)
    candidates: list[dict] = Field(min_length=1)

    @model_validator(mode="after")
    def _candidates(self):
        names = [c.get("name") for c in self.candidates]
        for i, c in enumerate(self.candidates):
            if "count" in c:
                raise ValueError(f"candidates[{i}]: no count here; the plan searches it")
        if len(set(names)) != len(names):
            raise ValueError("candidates need distinct names")
        return self


def load_plan(path: Path, rate_scale: float = 1.0, prompt_scale: float = 1.0,
              trace: Optional[str] = None) -> tuple[PlanSpec, list[dict], Path]:
    """The plan, one raw config per candidate (count 1; what-ifs applied) and the folder paths resolve from."""
    path = Path(path)
    raw = load_raw(path)
    for i, c in enumerate(raw.get("candidates") or []):
        if isinstance(c, dict):
            c.setdefault("name", f"{c.get('gpu', 'gpu')}-tp{c.get('tensor_parallel_size', 1)}-{i}")
    spec = parse_spec(PlanSpec, raw, path, "plan")
    base, base_dir = load_base(spec.base, path)
    if spec.workload is not None:
        base["workload"] = copy.deepcopy(spec.workload)
    if "workload" not in base:
        raise ConfigError(f"{path}: no workload (give `workload:` or a base config that has one)")
    w = base["workload"]
    if trace is not None:
        w.clear()
        w.update(kind="trace", path=trace)
    _what_if(w, rate_scale, prompt_scale, path)
    slo = base.setdefault("slo", {}).setdefault("classes", {})
    slo[w.get("slo_class", "default")] = spec.targets.model_dump(exclude={"attainment", "confidence", "model_error_runs"}, exclude_none=True)
    configs = []
    for c in spec.candidates:
        raw_c = copy.deepcopy(base)
        raw_c["name"] = f"{spec.name}-{c['name']}"
        group = {k: v for k, v in c.items() if k != "name"}
        raw_c["fleet"] = {"replicas": [{**group, "count": 1}]}
        raw_c.setdefault("output", {})["plots"] = False
        parse_config(raw_c, f"{path}: candidate {c['name']}")      # every candidate is valid before anything runs
        configs.append(raw_c)
    return spec, configs, base_dir


def _what_if(w: dict, rate_scale: float, prompt_scale: float, path) -> None:
    """Scale the arrival rate and prompt lengths of a workload section, whatever its kind."""
    if rate_scale != 1.0:
        if w.get("kind") == "trace":
            w["rate_scale"] = w.get("rate_scale", 1.0) * rate_scale
        elif "rate" in (w.get("arrival") or {}):
            w["arrival"]["rate"] *= rate_scale
        else:
            raise ConfigError(f"{path}: --rate-scale needs a trace or an arrival process with a rate")
    if prompt_scale != 1.0:
        w["prompt_scale"] = w.get("prompt_scale", 1.0) * prompt_scale if w.get("kind") == "trace" else None
        if w["prompt_scale"] is None:
            raise ConfigError(f"{path}: --prompt-scale works on trace workloads (synthetic: change the input lengths)")


def evaluate(raw: dict, base_dir: str, count: int, confidence: Optional[float] = None, model_runs: int = 0) -> dict:
    """Simulate the candidate with `count` replicas; the numbers the plan table and plot need. With a confidence,
    also the one-sided lower bound of the SLO attainment at it (`attainment_low`): workload randomness, and with
    model_runs the step-time model's error too (root sum of squares of the two one-sided half-widths)."""
    from servesim.sim.intervals import share_interval
    from servesim.sim.report import build_report, final_attempts, request_table, slo_met
    from servesim.sim.run import simulate

    raw = copy.deepcopy(raw)
    raw["fleet"]["replicas"][0]["count"] = count
    cfg = parse_config(raw)
    result = simulate(cfg, Path(base_dir))
    df = final_attempts(request_table(result))
    rep = build_report(result, df)
    c = rep["cost"]
    hours = c["gpu_hours"] / c["gpus"] if c["gpus"] else 0.0
    out = {"replicas": count, "gpus": c["gpus"], "usd_per_hour": c["usd"] / hours if hours else 0.0,
           "usd_per_1m_output_tokens": c["usd_per_1m_output_tokens"], "attainment": rep["slo"]["attainment"] or 0.0,
           "ttft_p99_ms": rep["latency_ms"]["ttft"]["p99"], "tpot_p99_ms": rep["latency_ms"]["tpot"]["p99"],
           "e2e_p99_ms": rep["latency_ms"]["e2e"]["p99"], "rejected": rep["requests"]["rejected"]}
    if confidence is not None:
        online = df[df["job"] == ""].sort_values("arrival_s", kind="stable")
        met = slo_met(df, result.config)[online.index].to_numpy(bool)
        iv = share_interval(out["attainment"], met, level=2 * confidence - 1)   # its low end: one-sided
        low = iv[0] if iv is not None else out["attainment"]
        if model_runs:
            from servesim.sim.uncertainty import model_error_runs, model_half
            runs = model_error_runs(cfg, Path(base_dir), model_runs, workers=1)   # already in a pool's worker
            xs = [v["slo.attainment"] or 0.0 for v in runs["values"]]
            if xs:
                hm = model_half(out["attainment"], xs, confidence)
                out["attainment_low_workload"] = low
                low = out["attainment"] - float(np.hypot(out["attainment"] - low, hm))
        out["attainment_low"] = low
    return out


def search(meets, max_n: int) -> tuple[Optional[int], list[int]]:
    """Fewest n in [1, max_n] with meets(n), assuming meets is monotone: doubling, then bisection.
    Returns (n or None, the counts evaluated in order)."""
    tried = []

    def ok(n):
        tried.append(n)
        return meets(n)
    lo, hi = 0, None                       # meets(lo) is false (0 replicas serve nothing), meets(hi) true
    n = 1
    while True:
        if ok(n):
            hi = n
            break
        lo = n
        if n == max_n:
            return None, tried
        n = min(2 * n, max_n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi, tried


def plan_candidate(raw: dict, base_dir: str, targets: dict, max_n: int) -> tuple[Optional[int], list[dict]]:
    evals: dict[int, dict] = {}
    t = Targets(**targets)

    def meets(n):
        evals[n] = evaluate(raw, base_dir, n, t.confidence, t.model_error_runs)
        judged = evals[n]["attainment"] if t.confidence is None else evals[n]["attainment_low"]
        evals[n]["meets"] = judged >= t.attainment
        return evals[n]["meets"]
    n, tried = search(meets, max_n)
    return n, [evals[k] for k in tried]


def run_plan(path: Path, out: Path, *, jobs: Optional[int] = None, rate_scale: float = 1.0,
             prompt_scale: float = 1.0, trace: Optional[str] = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per candidate: its cheapest fleet meeting the targets; every fleet evaluated)."""
    spec, configs, base_dir = load_plan(path, rate_scale, prompt_scale, trace)
    targets = spec.targets.model_dump()
    args = [(raw, str(base_dir), targets, spec.max_replicas) for raw in configs]
    jobs = min(jobs or os.cpu_count() or 1, len(args))
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(plan_candidate, *zip(*args)))
    else:
        results = [plan_candidate(*a) for a in args]
    rows, evals = [], []
    for c, (n, tried) in zip(spec.candidates, results):
        for e in tried:
            evals.append({"candidate": c["name"], **e})
        best = next((e for e in tried if e["replicas"] == n), None)
        rows.append({"candidate": c["name"], "gpu": c.get("gpu"), "tp": c.get("tensor_parallel_size", 1),
                     "replicas": n, "meets": n is not None, "evaluations": len(tried),
                     **({k: best[k] for k in ("gpus", "usd_per_hour", "usd_per_1m_output_tokens", "attainment",
                                              "ttft_p99_ms", "tpot_p99_ms", "e2e_p99_ms")} if best else {})})
    table = pd.DataFrame(rows)
    table["replicas"] = table["replicas"].astype("Int64")           # missing where no count meets the targets
    if "usd_per_hour" in table:
        table = table.sort_values(["meets", "usd_per_hour", "usd_per_1m_output_tokens"],
                                  ascending=[False, True, True], na_position="last", kind="stable")
    evaluated = pd.DataFrame(evals)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "plan.csv", index=False)
    evaluated.to_csv(out / "evaluated.csv", index=False)
    pareto_plot(evaluated, spec.targets, out / "pareto.png")
    return table.reset_index(drop=True), evaluated


def pareto_front(df: pd.DataFrame) -> pd.DataFrame:
    """Fleets meeting the targets that no other such fleet beats on both $/hour and p99 TTFT."""
    ok = df[df["meets"]].sort_values(["usd_per_hour", "ttft_p99_ms"], kind="stable")
    front, best = [], float("inf")
    for i, r in ok.iterrows():
        if r["ttft_p99_ms"] < best:
            front.append(i)
            best = r["ttft_p99_ms"]
    return ok.loc[front]


def pareto_plot(df: pd.DataFrame, targets: Targets, path: Path) -> None:
    from servesim.sim.plots import plt, save
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, g in df.groupby("candidate", sort=False):
        line = ax.scatter(g["usd_per_hour"], g["ttft_p99_ms"], marker="x", alpha=0.5)
        hit = g[g["meets"]]
        ax.scatter(hit["usd_per_hour"], hit["ttft_p99_ms"], color=line.get_facecolor()[0], label=name)
    front = pareto_front(df)
    if len(front):
        ax.step(front["usd_per_hour"], front["ttft_p99_ms"], where="post", color="black", lw=1, label="Pareto front")
    if targets.ttft_ms:
        ax.axhline(targets.ttft_ms, color="grey", ls="--", lw=1, label="TTFT target")
    ax.set_xlabel("fleet cost ($/hour)")
    ax.set_ylabel("p99 TTFT (ms)")
    ax.set_yscale("log")
    ax.set_title(f"fleets evaluated (dots meet the targets at {targets.attainment:.0%} attainment)")
    ax.legend(fontsize=8)
    save(fig, path)
