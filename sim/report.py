"""The report: a pure function of a run's metrics and config. Writes report.json, requests.csv,
timeseries.csv, summary.md and plots into the output folder."""
from __future__ import annotations

import json
import math
from operator import attrgetter
from pathlib import Path

import numpy as np
import pandas as pd

from .anomalies import find_anomalies
from .attribution import add_request_parts, attribution_report
from .batch_jobs import job_table, jobs_report
from .fault_report import faults_report
from .intervals import (LEVEL, SECTIONS, histogram_intervals, latency_intervals, rate_interval, share_interval,
                        verdict)
from .decisions import decisions_report
from .request import FAILED, FINISHED, REJECTED

PCTS = (50, 90, 95, 99)


# request table column <- Request attribute, and its dtype (None: strings)
I, F = np.int64, float
COLUMNS = (("id", "id", I), ("arrival_s", "arrival", F), ("prompt_tokens", "prompt_tokens", I),
           ("output_tokens", "output_tokens", I), ("generated_tokens", "num_output", I), ("replica", "replica", I),
           ("tenant", "tenant", None), ("slo_class", "slo_class", None), ("first_scheduled_s", "first_scheduled", F),
           ("first_token_s", "first_token", F), ("finish_s", "finish", F),
           ("cached_prompt_tokens", "num_cached_tokens", I), ("loaded_prompt_tokens", "num_loaded_tokens", I),
           ("preemptions", "preemptions", I), ("outcome", "outcome", None), ("reason", "reason", None),
           ("preempted_s", "preempted_s", F), ("preempted_ttft_s", "preempted_ttft_s", F), ("kv_load_s", "kv_load_s", F),
           ("prefill_replica", "prefill_replica", I), ("kv_transfer_s", "kv_transfer_s", F),
           ("attempt", "attempt", I), ("origin", "origin", I), ("sent_s", "sent", F), ("retried", "retried", bool))


def request_table(result) -> pd.DataFrame:
    reqs = result.metrics.requests
    n = len(reqs)
    # numeric columns straight into arrays (no list of a million Python numbers in between)
    df = pd.DataFrame({col: list(map(attrgetter(attr), reqs)) if dtype is None else
                       np.fromiter(map(attrgetter(attr), reqs), dtype, count=n) for col, attr, dtype in COLUMNS})
    df["outcome"] = df["outcome"].replace("", "unfinished")
    df["model"] = [r.model or result.replicas[r.replica].model if r.replica >= 0 else r.model or "" for r in reqs]
    specs = result.workload.job_specs or []
    df["job"] = [specs[r.job].name if r.job >= 0 else "" for r in reqs]
    df["deadline_s"] = [specs[r.job].deadline_s if r.job >= 0 else math.nan for r in reqs]
    df = df.sort_values("id", kind="stable").reset_index(drop=True)
    fin = df["outcome"] == FINISHED
    df["queue_s"] = (df["first_scheduled_s"] - df["arrival_s"]).where(fin)
    df["ttft_s"] = (df["first_token_s"] - df["arrival_s"]).where(fin)
    df["e2e_s"] = (df["finish_s"] - df["arrival_s"]).where(fin)
    multi = fin & (df["output_tokens"] > 1)
    df["tpot_s"] = ((df["finish_s"] - df["first_token_s"]) / (df["output_tokens"] - 1)).where(multi)
    return add_request_parts(df)


def _stats_ms(x: pd.Series) -> dict:
    x = x.dropna().to_numpy() * 1000.0
    if x.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PCTS}}
    q = np.percentile(x, PCTS)
    return {"mean": float(x.mean()), **{f"p{p}": float(v) for p, v in zip(PCTS, q)}}


def _meets(df: pd.DataFrame, slo) -> pd.Series:
    ok = df["outcome"] == FINISHED
    for col, lim in (("ttft_s", slo.ttft_ms), ("tpot_s", slo.tpot_ms), ("e2e_s", slo.e2e_ms)):
        if lim is not None:
            cond = df[col] <= lim / 1000.0
            if col == "tpot_s":
                cond |= df[col].isna()  # a one-token output has no TPOT to miss
            ok &= cond
    return ok


def _offload(result, prompt_tokens: int) -> dict:
    """Per offload tier, over all replicas: prompt tokens loaded back from it, their share of all prompt
    tokens, the seconds spent loading, the blocks it holds at the end; and blocks dropped off the last tier."""
    out: dict = {}
    dropped = 0
    for pool in result.pools:
        if pool.offload is None:
            continue
        dropped += pool.offload.dropped
        for t in pool.offload.tiers:
            d = out.setdefault(t.name, {"hit_tokens": 0, "hit_rate": 0.0, "load_s": 0.0, "blocks_held": 0})
            d["hit_tokens"] += t.hit_blocks * pool.block_size
            d["load_s"] += t.load_s
            d["blocks_held"] += len(t.blocks)
    for d in out.values():
        d["hit_rate"] = d["hit_tokens"] / prompt_tokens
    if out:
        out["dropped_blocks"] = dropped
    return out


def meets_slo(req, classes) -> bool:
    """One finished request against its class's thresholds (the autoscaler's slo_attainment signal)."""
    if req.outcome != FINISHED:
        return False
    slo = classes[req.slo_class]
    ttft, e2e = req.first_token - req.arrival, req.finish - req.arrival
    tpot = (req.finish - req.first_token) / (req.output_tokens - 1) if req.output_tokens > 1 else None
    return ((slo.ttft_ms is None or ttft <= slo.ttft_ms / 1000) and (slo.e2e_ms is None or e2e <= slo.e2e_ms / 1000)
            and (slo.tpot_ms is None or tpot is None or tpot <= slo.tpot_ms / 1000))


def paid_s(result, r, duration: float) -> float:
    """Seconds replica r's GPUs are paid for: the whole run, or what the autoscaler kept it up."""
    return result.paid_s.get(r.index, duration) if result.paid_s else duration


def slo_met(df: pd.DataFrame, cfg) -> pd.Series:
    """For each request: did it meet every threshold of its own SLO class? (A batch job's: its job's deadline.)"""
    met = pd.Series(False, index=df.index)
    online = df["job"] == ""
    for name, slo in cfg.slo.classes.items():
        sub = df[online & (df["slo_class"] == name)]
        met[sub.index] = _meets(sub, slo)
    met[~online] = (df["outcome"] == FINISHED) & (df["finish_s"] <= df["deadline_s"])
    return met


def _tenant(sub: pd.DataFrame, met: pd.Series, duration: float) -> dict:
    """A slice of the run (a tenant, a replica group): its requests, latencies and SLO attainment (each request
    judged by its own class)."""
    fin = sub["outcome"] == FINISHED
    return {"requests": int(len(sub)), "finished": int(fin.sum()),
            "rejected": int((sub["outcome"] == REJECTED).sum()),
            "ttft_ms": {k: v for k, v in _stats_ms(sub["ttft_s"]).items() if k in ("p50", "p99")},
            "tpot_ms": {k: v for k, v in _stats_ms(sub["tpot_s"]).items() if k in ("p50", "p99")},
            "output_tokens_per_s": int(sub.loc[fin, "output_tokens"].sum()) / duration,
            "slo_attainment": float(met.mean()) if len(sub) else None}


def _groups(result, df: pd.DataFrame, met: pd.Series, duration: float) -> dict:
    """Latency and SLO attainment of the requests each replica group served (a canary against the rest, one
    GPU pool against another)."""
    name = {r.index: r.group for r in result.replicas}
    grp = df["replica"].map(name)
    return {g: _tenant(df[grp == g], met[grp == g], duration) for g in dict.fromkeys(name.values())}


def session_table(result) -> pd.DataFrame:
    """One row per agentic session: when it ran, its requests and tokens, time thinking and waiting on the
    server (duration - think), prompt tokens served from the prefix cache."""
    rows = []
    last = {r.origin: r for r in result.metrics.requests if not r.retried}    # each turn's last attempt
    for log in result.session_logs:
        reqs = [last.get(r.id, r) for r in log.requests]
        done = log.end == log.end
        rows.append({"session": log.session, "name": log.name, "start_s": log.start,
                     "end_s": log.end if done else math.nan,
                     "duration_s": log.end - log.start if done else math.nan,
                     "think_s": log.think_s, "waiting_on_server_s": log.end - log.start - log.think_s if done else math.nan,
                     "requests": len(reqs), "finished": sum(r.outcome == FINISHED for r in reqs),
                     "prompt_tokens": sum(r.prompt_tokens for r in reqs),
                     "output_tokens": sum(r.num_output for r in reqs),
                     "cached_prompt_tokens": sum(r.num_cached_tokens for r in reqs)})
    return pd.DataFrame(rows)


def _sessions(st: pd.DataFrame) -> dict:
    done = st[st["end_s"].notna()]
    q = lambda col: ({f"p{p}": float(v) for p, v in zip(PCTS, np.percentile(done[col], PCTS))}  # noqa: E731
                     if len(done) else {})
    return {"sessions": int(len(st)), "completed": int(len(done)),
            "duration_s": {"mean": float(done["duration_s"].mean()) if len(done) else None, **q("duration_s")},
            "waiting_on_server_s": {"mean": float(done["waiting_on_server_s"].mean()) if len(done) else None,
                                    **q("waiting_on_server_s")},
            "waiting_share": float(done["waiting_on_server_s"].sum() / done["duration_s"].sum())
            if len(done) and done["duration_s"].sum() > 0 else None,
            "requests_per_session": float(st["requests"].mean()),
            "tokens_per_session": float((st["prompt_tokens"] + st["output_tokens"]).mean()),
            "prefix_cache_hit_rate": float(st["cached_prompt_tokens"].sum() / max(st["prompt_tokens"].sum(), 1))}


def _disaggregation(df: pd.DataFrame, result) -> dict:
    """KV transfers from prefill to decode replicas: the link, how many, how long each took."""
    moved = df[df["prefill_replica"] >= 0]
    return {"link": result.config.disaggregation.model_dump(), "transfers": int(len(moved)),
            "transfer_ms": _stats_ms(moved["kv_transfer_s"])}


def _cost_by_group(result, df: pd.DataFrame, m, duration: float) -> dict:
    """Per replica group (pool): its GPUs, what they cost over the run, what they served and at what price per
    token. The groups' usd sum to the run's."""
    fin = df[df["outcome"] == FINISHED]
    tokens = fin.groupby("replica")["output_tokens"].sum()
    served = fin.groupby("replica").size()
    out: dict = {}
    for r, s in zip(result.replicas, m.replicas):
        g = out.setdefault(r.group, {"replicas": 0, "gpu": r.gpu, "model": r.model, "gpus": 0, "gpu_hours": 0.0,
                                     "usd": 0.0, "requests": 0, "output_tokens": 0, "busy_s": 0.0})
        g["replicas"] += 1
        g["gpus"] += r.num_gpus
        g["gpu_hours"] += r.num_gpus * paid_s(result, r, duration) / 3600.0
        g["usd"] += r.num_gpus * r.usd_per_gpu_hour * paid_s(result, r, duration) / 3600.0
        g["requests"] += int(served.get(r.index, 0))
        g["output_tokens"] += int(tokens.get(r.index, 0))
        g["busy_s"] += s.busy_s
    for g in out.values():
        g["usd_per_1m_output_tokens"] = g["usd"] / g["output_tokens"] * 1e6 if g["output_tokens"] else None
        g["busy_fraction"] = g.pop("busy_s") / (g["replicas"] * duration)
    return out


def final_attempts(df: pd.DataFrame) -> pd.DataFrame:
    """One row per request as its client saw it: the last attempt of each (retries keep the first's arrival)."""
    return df[~df["retried"]] if df["retried"].any() else df


def build_report(result, df: pd.DataFrame | None = None) -> dict:
    cfg, m = result.config, result.metrics
    attempts = request_table(result) if df is None else df
    df = final_attempts(attempts)
    fin = df["outcome"] == FINISHED
    start = float(df["arrival_s"].min()) if len(df) else 0.0
    duration = max(result.sim_end - start, 1e-12)
    out_tok = int(df.loc[fin, "output_tokens"].sum())
    in_tok = int(df.loc[fin, "prompt_tokens"].sum())
    itl = m.itl
    online = df[df["job"] == ""]            # latency and SLOs are online traffic's; batch jobs have deadlines
    latency = {k: _stats_ms(online[c]) for k, c in (("ttft", "ttft_s"), ("tpot", "tpot_s"), ("e2e", "e2e_s"),
                                                       ("queue", "queue_s"))}
    if cfg.output.ci:
        latency_intervals(online, latency, PCTS, {"ttft": "ttft_s", "tpot": "tpot_s", "e2e": "e2e_s", "queue": "queue_s"})
    latency["itl"] = {"mean": itl.mean() * 1000 if itl.n else None,
                      **{f"p{p}": (itl.quantile(p / 100) * 1000 if itl.n else None) for p in PCTS}}
    if cfg.output.ci and itl.n:
        histogram_intervals(itl, latency["itl"], PCTS)
    classes, met_total = {}, 0
    met_by_request = slo_met(df, cfg)
    for name, slo in cfg.slo.classes.items():
        sub = online[online["slo_class"] == name]
        met = int(met_by_request[sub.index].sum())
        met_total += met
        classes[name] = {"requests": int(len(sub)), "met": met,
                         "attainment": met / len(sub) if len(sub) else None,
                         "goodput_requests_per_s": met / duration,
                         "targets_ms": slo.model_dump(exclude={"priority", "attainment_target"})}
        if cfg.output.ci:
            c = classes[name]
            ordered = met_by_request[sub.sort_values("arrival_s", kind="stable").index].to_numpy(bool)
            c["attainment_ci"] = share_interval(c["attainment"], ordered)
            if slo.attainment_target is not None:
                c["attainment_target"] = slo.attainment_target
                c["verdict"] = verdict(c["attainment_ci"], c["attainment"], slo.attainment_target)
    gpus = sum(r.num_gpus for r in result.replicas)
    gpu_hours = sum(r.num_gpus * paid_s(result, r, duration) for r in result.replicas) / 3600.0
    usd = sum(r.num_gpus * r.usd_per_gpu_hour * paid_s(result, r, duration) for r in result.replicas) / 3600.0
    flops = sum(s.flops for s in m.replicas)
    nbytes = sum(s.bytes for s in m.replicas)
    kv_usage = [s.kv_block_seconds / (r.num_blocks * duration) for s, r in zip(m.replicas, result.replicas)]
    return {
        "name": cfg.name,
        "seed": cfg.seed,
        "workload": result.workload.description,
        "requests": {
            "total": int(len(df)), "finished": int(fin.sum()),
            "rejected": int((df["outcome"] == REJECTED).sum()),
            "failed": int((df["outcome"] == FAILED).sum()),
            "unfinished": int((df["outcome"] == "unfinished").sum()),
            "rejected_by_reason": dict(sorted(result.rejections.items())),
            "preempted": int((df["preemptions"] > 0).sum()),
            "preemptions": int(df["preemptions"].sum()),
            "swapped": int(sum(s.swaps for s in m.replicas)),
            "from_response_cache": int((df["reason"] == "response_cache").sum()),
            "swap_s": float(sum(s.swap_s for s in m.replicas)),
        },
        "latency_ms": latency,
        "throughput": {
            "requests_per_s": int(fin.sum()) / duration,
            "output_tokens_per_s": out_tok / duration,
            **({"output_tokens_per_s_ci": rate_interval(out_tok / duration, df.loc[fin, "finish_s"].to_numpy(float),
                                                         df.loc[fin, "output_tokens"].to_numpy(float), start,
                                                         start + duration)} if cfg.output.ci else {}),
            "total_tokens_per_s": (out_tok + in_tok) / duration,
        },
        "slo": {"attainment": met_total / len(online) if len(online) else None,
                **({"attainment_ci": share_interval(met_total / len(online) if len(online) else None,
                                                    met_by_request[online.sort_values("arrival_s", kind="stable").index]
                                                    .to_numpy(bool))} if cfg.output.ci else {}),
                "goodput_requests_per_s": met_total / duration, "classes": classes},
        **({"ci": {"method": "sectioning", "sections": SECTIONS, "level": LEVEL,
                   "covers": "workload randomness (not the step-time model's error)"}} if cfg.output.ci else {}),
        "tenants": {t: _tenant(sub, met_by_request[sub.index], duration) for t, sub in df.groupby("tenant", sort=True)},
        "cost": {"gpus": gpus, "gpu_hours": gpu_hours, "usd": usd,
                 "usd_per_1m_output_tokens": usd / out_tok * 1e6 if out_tok else None,
                 "usd_per_request": usd / int(fin.sum()) if fin.any() else None,
                 "by_group": _cost_by_group(result, df, m, duration)},
        "groups": _groups(result, df, met_by_request, duration),
        **({"autoscaling": result.autoscaling} if result.autoscaling is not None else {}),
        **({"disaggregation": _disaggregation(df, result)} if result.config.disaggregation is not None else {}),
        **({"sessions": _sessions(session_table(result))} if result.session_logs is not None else {}),
        **({"batch_jobs": jobs_report(job_table(result))} if result.workload.job_specs else {}),
        **({"faults": faults_report(result, attempts, df, met_by_request)} if result.faults is not None
           or result.config.client.max_retries or result.config.client.timeout_s else {}),
        **({"models": {name: _tenant(sub, met_by_request[sub.index], duration)
                       for name, sub in df.groupby("model", sort=True)}} if len({r.model for r in result.replicas}) > 1
           else {}),
        "utilization": {
            "mfu": flops / (sum(r.peak_flops for r in result.replicas) * duration),
            "mbu": nbytes / (sum(r.peak_bw for r in result.replicas) * duration),
            "kv_usage_mean": float(np.mean(kv_usage)) if kv_usage else 0.0,
            "busy_fraction": float(np.mean([s.busy_s / duration for s in m.replicas])),
        },
        "prefix_cache": {"hit_tokens": int(df["cached_prompt_tokens"].sum()),
                         "hit_rate": float(df["cached_prompt_tokens"].sum() / max(df["prompt_tokens"].sum(), 1)),
                         "evicted_blocks": int(sum(p.evictions for p in result.pools)),
                         "offload": _offload(result, max(int(df["prompt_tokens"].sum()), 1))},
        "sim": {"wall_s": result.wall_s, "peak_rss_mb": result.peak_rss_mb,
                "iterations": int(sum(s.iterations for s in m.replicas)), "events": int(result.events),
                "simulated_s": duration},
        "replicas": [{"index": r.index, "group": r.group, "gpu": r.gpu, "model": r.model, "tp": r.tp, "pp": r.pp,
                      "kv_blocks": r.num_blocks, "block_size": r.block_size, "memory": r.memory,
                      "iterations": s.iterations, "busy_fraction": s.busy_s / duration,
                      "preemptions": s.preemptions, "requests": int((df["replica"] == r.index).sum())}
                     for r, s in zip(result.replicas, m.replicas)],
        "attribution": attribution_report(result, online),
        "anomalies": find_anomalies(result, online, met_by_request[online.index], duration),   # batch waits by design
        **({"decisions": decisions_report(m.decisions, result.regret)} if m.decisions is not None else {}),
    }


def timeseries(result) -> pd.DataFrame:
    """Every replica's samples (time, waiting, running, KV blocks used), replica by replica. Built from one array per
    replica: pandas takes ~15 us a row from a list of tuples (4 s for the 1M benchmark's samples)."""
    reps = result.metrics.replicas
    arrs = [np.array(st.samples, dtype=float).reshape(-1, 4) for st in reps]     # counts stay exact (< 2^53)
    a = np.concatenate(arrs)
    ts = pd.DataFrame({"replica": np.repeat(np.arange(len(reps)), [len(x) for x in arrs]), "t_s": a[:, 0],
                       "waiting": a[:, 1].astype(np.int64), "running": a[:, 2].astype(np.int64),
                       "kv_used_blocks": a[:, 3].astype(np.int64)})
    blocks = {r.index: r.num_blocks for r in result.replicas}
    ts["kv_usage"] = ts["kv_used_blocks"] / ts["replica"].map(blocks)
    return ts


def _fmt(v, unit=""):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.1f}{unit}" if abs(v) >= 10 else f"{v:,.3g}{unit}"


def _ci(iv) -> str:
    return f" [{_fmt(iv[0])}, {_fmt(iv[1])}]" if iv else ""


def _uncertainty_lines(rep: dict) -> list[str]:
    """What the intervals cover, and each source's share (half-widths) for the headline statistics."""
    ci = rep["ci"]
    me = ci.get("model_error", {})
    level = f"{100 * ci['level']:.0f}%"
    if not me.get("runs"):
        why = ("no replica priced by the roofline model" if me else "model_error_runs 0")
        return [f"[low, high]: {level} intervals from workload randomness ({ci['sections']} sections of the run); "
                f"the step-time model's error is not in them ({why})."]
    L = [f"[low, high]: {level} intervals combining workload randomness ({ci['sections']} sections of the run) and "
         f"the step-time model's error ({me['runs']} runs with op times perturbed by the reference kernels' "
         "residuals)" + (f"; replicas priced by {', '.join(me['not_covered_perf_models'])} are not perturbed"
                         if me.get("not_covered_perf_models") else "") + ".", "",
         "| +- half-width | workload | model | combined |", "|---|---:|---:|---:|"]

    def half(iv, point):
        return _fmt(max(point - iv[0], iv[1] - point)) if iv and point is not None else "-"
    lat = rep["latency_ms"]
    for m in ("ttft", "tpot", "itl", "e2e"):
        for p in ("p50", "p99"):
            st = lat[m]
            L.append(f"| {m.upper()} {p} (ms) | " + " | ".join(half(st.get(f"{p}{k}"), st[p])
                                                            for k in ("_ci_workload", "_ci_model", "_ci")) + " |")
    t = rep["throughput"]
    L.append("| output tok/s | " + " | ".join(half(t.get(f"output_tokens_per_s{k}"), t["output_tokens_per_s"])
                                            for k in ("_ci_workload", "_ci_model", "_ci")) + " |")
    s = rep["slo"]
    if s["attainment"] is not None:
        L.append("| SLO attainment (points) | " + " | ".join(
            half([100 * x for x in s[f"attainment{k}"]] if s.get(f"attainment{k}") else None, 100 * s["attainment"])
            for k in ("_ci_workload", "_ci_model", "_ci")) + " |")
    return L


def _slice_row(name: str, tn: dict) -> str:
    att = tn["slo_attainment"]
    return (f"| {name} | {tn['requests']} | {tn['finished']} | {tn['rejected']} | "
            f"{_fmt(tn['ttft_ms']['p50'])} / {_fmt(tn['ttft_ms']['p99'])} | "
            f"{_fmt(tn['tpot_ms']['p50'])} / {_fmt(tn['tpot_ms']['p99'])} | "
            f"{_fmt(tn['output_tokens_per_s'])} | {_fmt(100 * att if att is not None else None)} % |")


def summary_markdown(rep: dict) -> str:
    L = [f"# servesim report: {rep['name']}", "", f"Workload: {rep['workload']}; seed {rep['seed']}.", ""]
    rq = rep["requests"]
    why = ", ".join(f"{k}: {v}" for k, v in rq["rejected_by_reason"].items())
    L += [f"Requests: {rq['total']} total, {rq['finished']} finished, {rq['rejected']} rejected"
          f"{f' ({why})' if why else ''}, {rq['failed']} failed, {rq['unfinished']} unfinished; "
          f"{rq['preemptions']} preemptions.", ""]
    L += ["| latency (ms) | mean | p50 | p90 | p95 | p99 |", "|---|---:|---:|---:|---:|---:|"]
    for k in ("ttft", "tpot", "itl", "e2e", "queue"):
        s = rep["latency_ms"][k]
        L.append(f"| {k.upper()} | " + " | ".join(_fmt(s[c]) + _ci(s.get(f"{c}_ci"))
                                                  for c in ("mean", "p50", "p90", "p95", "p99")) + " |")
    if "ci" in rep:
        L += ["", *_uncertainty_lines(rep)]
    t, c, u, s = rep["throughput"], rep["cost"], rep["utilization"], rep["slo"]
    L += ["", "| metric | value |", "|---|---:|",
          f"| throughput | {_fmt(t['requests_per_s'])} req/s, {_fmt(t['output_tokens_per_s'])}"
          f"{_ci(t.get('output_tokens_per_s_ci'))} output tok/s, "
          f"{_fmt(t['total_tokens_per_s'])} total tok/s |",
          f"| SLO attainment | {_fmt(100 * s['attainment'] if s['attainment'] is not None else None)} % "
          f"(goodput {_fmt(s['goodput_requests_per_s'])} req/s) |",
          f"| cost | ${_fmt(c['usd'])} for {_fmt(c['gpu_hours'])} GPU-hours; "
          f"${_fmt(c['usd_per_1m_output_tokens'])} per 1M output tokens |",
          f"| utilization | MFU {_fmt(100 * u['mfu'])} %, MBU {_fmt(100 * u['mbu'])} %, "
          f"KV {_fmt(100 * u['kv_usage_mean'])} %, busy {_fmt(100 * u['busy_fraction'])} % |",
          f"| prefix cache | {_fmt(100 * rep['prefix_cache']['hit_rate'])} % of prompt tokens hit |",
          f"| simulator | {_fmt(rep['sim']['wall_s'])} s wall, {rep['sim']['iterations']:,} iterations, "
          f"{rep['sim']['events']:,} events, {_fmt(rep['sim']['peak_rss_mb'])} MB peak RSS |", ""]
    for name, cl in s["classes"].items():
        tg = ", ".join(f"{k} <= {v:g}" for k, v in cl["targets_ms"].items() if v is not None) or "no targets"
        att = _fmt(100 * cl["attainment"]) if cl["attainment"] is not None else "-"
        iv = cl.get("attainment_ci")
        att += f" % [{_fmt(100 * iv[0])}, {_fmt(100 * iv[1])}]" if iv else " %"
        v = f"; target {_fmt(100 * cl['attainment_target'])} %: **{cl['verdict']}**" if "verdict" in cl else ""
        L.append(f"- SLO class `{name}` ({tg}): {cl['met']}/{cl['requests']} met ({att}){v}")
    if len(rep["tenants"]) > 1:
        L += ["", "| tenant | requests | finished | rejected | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | output tok/s "
                  "| SLO attainment |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, tn in rep["tenants"].items():
            L.append(_slice_row(name, tn))
    reg = rep.get("decisions", {}).get("routing_regret")
    if reg and reg["samples"]:
        L += ["", f"Routing regret over {reg['samples']} sampled decisions (up to {reg['top_k']} alternatives each, "
                  f"{reg['lookahead_s']:g} s look-ahead): mean {1000 * reg['mean_regret_s']:,.1f} ms, max "
                  f"{1000 * reg['max_regret_s']:,.1f} ms; {100 * reg['share_suboptimal']:.0f}% had a better alternative."]
    groups = rep["cost"]["by_group"]
    if len(groups) > 1:
        L += ["", "| pool | replicas | GPUs | requests | output tokens | busy | TTFT p99 (ms) | TPOT p99 (ms) "
                  "| SLO attainment | $ | $ per 1M output tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, g in groups.items():
            lat = rep["groups"][name]
            att = lat["slo_attainment"]
            L.append(f"| {name} | {g['replicas']} | {g['gpus']} | {g['requests']:,} | {g['output_tokens']:,} | "
                     f"{_fmt(100 * g['busy_fraction'])} % | {_fmt(lat['ttft_ms']['p99'])} | {_fmt(lat['tpot_ms']['p99'])} "
                     f"| {_fmt(100 * att if att is not None else None)} % "
                     f"| {_fmt(g['usd'])} | {_fmt(g['usd_per_1m_output_tokens'])} |")
    fr = rep.get("faults")
    if fr:
        q = fr["requests"]
        L += ["", f"Faults: {len(fr['events'])} injected; replica uptime {_fmt(100 * fr['availability']['replica_uptime'])} %; "
                  f"{q['failed']:,} requests failed, {q['retried']:,} retried ({q['succeeded_after_retry']:,} then "
                  f"succeeded), {q['attempts']:,} attempts; {fr['kv_blocks_lost']:,} KV blocks lost."]
        for e in fr["events"]:
            pct = lambda v: f"{_fmt(100 * v)} %" if v is not None else "-"  # noqa: E731
            L.append(f"- {e['kind']} at {_fmt(e['t'])} s (replicas {e['replicas']}, until {_fmt(e.get('until'))} s): SLO "
                     f"attainment {pct(e['slo_before'])} before, {pct(e['slo_during'])} during, {pct(e['slo_after'])} "
                     f"after; back to its level {_fmt(e['slo_recovered_s'])} s after the fault")
    bj = rep.get("batch_jobs")
    if bj:
        L += ["", f"Batch jobs: {bj['met_deadline']}/{bj['jobs']} met their deadline; {bj['finished_by_deadline']:,}"
                  f"/{bj['requests']:,} requests done by theirs.", "",
              "| job | requests | finished | by deadline | submitted (s) | deadline (s) | done (s) | late (s) | preemptions |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, j in bj["by_job"].items():
            L.append(f"| {name} | {j['requests']:,} | {j['finished']:,} | {j['finished_by_deadline']:,} | "
                     f"{_fmt(j['submit_s'])} | {_fmt(j['deadline_s'])} | {_fmt(j['completed_s'])} | "
                     f"{_fmt(max(j['lateness_s'], 0.0) if j['lateness_s'] is not None else None)} | {j['preemptions']:,} |")
    models = rep.get("models")
    if models:
        L += ["", "| model | requests | finished | rejected | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | output tok/s "
                  "| SLO attainment |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, tn in models.items():
            L.append(_slice_row(name, tn))
    found = rep["anomalies"]["found"]
    L += ["", "Anomalies: " + ("none found." if not found else "")] + [f"- {f}" for f in found]
    return "\n".join(L) + "\n"


def write_outputs(result, out_dir: Path, plots: bool = True, model_runs: dict | None = None) -> dict:
    """model_runs: the perturbed runs of sim/uncertainty.py, whose spread joins the report's intervals."""
    out_dir.mkdir(parents=True, exist_ok=True)
    from .export import prometheus_text, replica_rates, write_csv
    attempts = request_table(result)
    rep = build_report(result, attempts)
    if model_runs is not None and result.config.output.ci:
        from .uncertainty import apply
        apply(rep, model_runs)
    write_csv(attempts, out_dir / "requests.csv")
    df = final_attempts(attempts)
    ts = timeseries(result)
    write_csv(ts, out_dir / "timeseries.csv")
    rates = replica_rates(result, df, slo_met(df, result.config))
    write_csv(rates, out_dir / "replica_rates.csv")
    (out_dir / "metrics.prom").write_text(prometheus_text(ts, rates))
    if result.metrics.decisions is not None:
        result.metrics.decisions.write(out_dir / "decisions.jsonl.gz")
    if result.session_logs is not None:
        write_csv(session_table(result), out_dir / "sessions.csv")
    if result.workload.job_specs:
        write_csv(job_table(result), out_dir / "jobs.csv")
    (out_dir / "report.json").write_text(json.dumps(rep, indent=2, allow_nan=False, default=_jsonable) + "\n")
    md = summary_markdown(rep)
    (out_dir / "summary.md").write_text(md)
    if plots:
        from .plots import write_plots
        write_plots(result, df, ts, out_dir, rates, rep)
    from .html import write_html
    write_html(md, out_dir)
    return rep


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o))
