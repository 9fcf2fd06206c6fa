"""`servesim explain RUN_DIR`: the run's bottleneck in words, with the numbers behind it, and a stacked plot.

Reads only what `servesim run` wrote (report.json: its attribution and anomalies sections), so any run
folder can be explained later, on another machine.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ServesimError

CLASSES = (("compute_s", "compute-bound"), ("memory_s", "memory-bound"), ("collective_s", "collectives"),
           ("overhead_s", "CPU overhead"), ("kv_load_s", "KV loads"), ("other_s", "unattributed"))
BLOCKER_NAMES = {"max_num_seqs": "max_num_seqs", "token_budget": "the token budget (max_num_batched_tokens)",
                 "kv_blocks": "free KV blocks", "policy": "the batching policy holding requests back"}


def load_report(run_dir: Path) -> dict:
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise ServesimError(f"{run_dir}: no report.json here (give the folder `servesim run` wrote)")
    rep = json.loads(path.read_text())
    if "attribution" not in rep:
        raise ServesimError(f"{path}: written by a servesim without attribution; run the config again")
    return rep


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _split(d: dict) -> str:
    """'91% memory-bound, 9% compute-bound' for the classes that hold time, largest first."""
    busy = d["busy_s"]
    if busy <= 0:
        return "no busy time"
    parts = sorted(((d[k] / busy, name) for k, name in CLASSES if d[k] / busy >= 0.005), reverse=True)
    return ", ".join(f"{_pct(v)} {name}" for v, name in parts)


def _latency_line(rep: dict, metric: str, label: str) -> tuple[str, str] | None:
    a = rep["attribution"]["requests"].get(metric)
    if not a:
        return None
    tail = a["p99_tail"]
    share = tail["share"]
    top = max(share, key=share.get)
    others = ", ".join(f"{_pct(v)} {k}" for k, v in sorted(share.items(), key=lambda kv: -kv[1])
                       if k != top and v >= 0.005)
    n_rep = len(rep["replicas"])
    where = ""
    if n_rep > 1 and tail["top_replica_share"] > 1.5 / n_rep:
        where = f" on replica {tail['top_replica']} ({_pct(tail['top_replica_share'])} of the tail requests)"
    line = (f"{label} p99 is {a['p99_ms']:,.0f} ms, {_pct(share[top])} {top}{where}"
            f"{'; then ' + others if others else ''}.")
    return line, top


def explain(rep: dict) -> list[str]:
    """The findings, most important first."""
    out = []
    at = rep["attribution"]
    steps = at["steps"]
    ttft = _latency_line(rep, "ttft", "TTFT")
    e2e = _latency_line(rep, "e2e", "E2E latency")
    for x in (ttft, e2e):
        if x:
            out.append(x[0])
    for kind, label in (("decode", "Decode steps"), ("prefill", "Steps with prompt tokens")):
        k = steps["by_kind"][kind]
        if k["steps"]:
            out.append(f"{label} ({k['steps']:,}, mean batch {k['mean_batch']:.1f} sequences, "
                       f"{k['busy_s']:,.1f} s) are {_split(k)}.")
    busy = rep["utilization"]["busy_fraction"]
    out.append(f"Replicas were busy {_pct(busy)} of the run on average; KV blocks {_pct(rep['utilization']['kv_usage_mean'])} "
               f"used.")
    blocked = steps["blocked_s"]
    total = sum(blocked.values())
    if total > 0:
        top = max(blocked, key=blocked.get)
        shares = ", ".join(f"{BLOCKER_NAMES[b]} {_pct(v / total)}" for b, v in sorted(blocked.items(), key=lambda kv: -kv[1])
                           if v / total >= 0.005)
        out.append(f"Requests waited during {total:,.1f} busy seconds; what kept the queue's head out: {shares}.")
        out.append(_advice(top, rep))
    fr = rep.get("faults")
    if fr and fr["events"]:
        worst = min(fr["events"], key=lambda e: e["slo_during"] if e["slo_during"] is not None else 1.0)
        q = fr["requests"]
        out.append(f"Faults: {len(fr['events'])} injected; the worst, {worst['kind']} at {worst['t']:,.0f} s, left "
                   f"{_pct(worst['slo_during']) if worst['slo_during'] is not None else '-'} of requests in the "
                   f"system within their SLO; {q['retried']:,} requests retried, {q['failed']:,} failed.")
    bj = rep.get("batch_jobs")
    if bj:                                   # the latency above is online traffic's; batch jobs run by deadline
        late = [n for n, j in bj["by_job"].items() if not j["met_deadline"]]
        out.append(f"Batch jobs: {bj['met_deadline']}/{bj['jobs']} met their deadline"
                   + (f" (late or unfinished: {', '.join(late)})" if late else "") + "; latency above is online traffic's.")
    found = rep["anomalies"]["found"]
    out += [f"Anomaly: {f}." for f in found]
    if ttft:
        out.insert(0, "Bottleneck: " + _headline(ttft[1], rep, top if total > 0 else None))
    return out


def _headline(ttft_top: str, rep: dict, blocker: str | None) -> str:
    steps = rep["attribution"]["steps"]
    if ttft_top == "queueing":
        cap = f", capped by {BLOCKER_NAMES[blocker]}" if blocker else ""
        hol = rep["anomalies"]["hol_blocking"]
        if hol:
            return (f"queueing on replica {hol[0]['replica']} (head-of-line blocking: its queue averages "
                    f"{hol[0]['mean_queue']:.1f} vs {hol[0]['others_mean_queue']:.1f} elsewhere).")
        return f"queueing for capacity{cap}."
    if ttft_top == "prefill":
        p = steps["by_kind"]["prefill"]
        return f"prefill work itself ({_split(p)})."
    if ttft_top == "preemption":
        return "preemptions: requests lose their KV and wait to recompute it (KV memory is short)."
    return f"{ttft_top}."


def _advice(blocker: str, rep: dict) -> str:
    kv = rep["utilization"]["kv_usage_mean"]
    seqs = sorted({r["max_num_seqs"] for r in rep["attribution"]["replicas"]})
    if blocker == "max_num_seqs":
        if kv >= 0.85:
            return (f"Raising max_num_seqs ({', '.join(map(str, seqs))}) is capped by KV blocks: they are already "
                    f"{_pct(kv)} used on average.")
        return (f"KV blocks are {_pct(kv)} used on average: raising max_num_seqs ({', '.join(map(str, seqs))}) "
                "would admit more requests per step.")
    if blocker == "kv_blocks":
        return ("KV memory is the limit: more GPU memory per replica, an fp8 KV cache, prefix caching or shorter "
                "max_model_len would admit more.")
    if blocker == "token_budget":
        return "The token budget is the limit: raise max_num_batched_tokens (prefill chunks compete with decodes)."
    return "The batching policy held requests back while capacity was free (static or dynamic batching, priorities)."


def plot(rep: dict, path: Path) -> Path:
    """Left: TTFT and E2E p99 tails and means split by phase. Right: each replica's busy seconds by class."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .plots import save

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    req = rep["attribution"]["requests"]
    bars, labels = [], []
    for metric, name in (("ttft", "TTFT"), ("e2e", "E2E")):
        a = req.get(metric)
        if not a:
            continue
        total_mean = sum(a["mean_ms"].values())
        bars.append({k: v / total_mean if total_mean else 0 for k, v in a["mean_ms"].items()})
        labels.append(f"{name} mean\n{total_mean:,.0f} ms")
        bars.append(a["p99_tail"]["share"])
        labels.append(f"{name} p99 tail\n{a['p99_ms']:,.0f} ms")
    phases = sorted({k for b in bars for k in b}, key=["queueing", "prefill", "decode", "preemption",
                                                        "KV offload loads", "KV transfer"].index)
    bottom = np.zeros(len(bars))
    for ph in phases:
        v = np.array([100 * b.get(ph, 0.0) for b in bars])
        a1.bar(labels, v, bottom=bottom, label=ph)
        bottom += v
    a1.set_ylabel("% of latency")
    a1.set_title("Where request latency went")
    a1.legend(fontsize=8)
    reps = rep["attribution"]["replicas"]
    x = np.arange(len(reps))
    bottom = np.zeros(len(reps))
    for key, name in CLASSES:
        v = np.array([max(r[key], 0.0) for r in reps])
        if v.any():
            a2.bar(x, v, bottom=bottom, label=name)
            bottom += v
    dur = rep["sim"]["simulated_s"]
    a2.bar(x, np.maximum(dur - bottom, 0), bottom=bottom, color="lightgrey", label="idle")
    a2.set_xticks(x, [str(r["index"]) for r in reps] if len(reps) <= 32 else [""] * len(reps))
    a2.set_xlabel("replica")
    a2.set_ylabel("seconds")
    a2.set_title("Where each replica's time went")
    a2.legend(fontsize=8)
    return save(fig, path)
