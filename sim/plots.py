"""PNG plots of a run: latency CDFs, throughput and queue over time, KV usage per replica."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def cdf(ax, values, label, style="-"):
    """Empirical CDF of seconds, drawn in milliseconds."""
    v = np.sort(values[~np.isnan(values)]) * 1000.0
    if v.size:
        ax.plot(v, np.arange(1, v.size + 1) / v.size, style, label=label)


def save(fig, path: Path, title: str | None = None) -> Path:
    """Title, tighten, write (PNG, 110 dpi) and close a figure."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ci_bands(ax, stats: dict) -> None:
    """Each percentile's interval as a band across the CDF at its level (p50 at 0.5, ...): where the curve may
    cross that level, given workload randomness and the step-time model's error."""
    for k, iv in stats.items():
        if k.startswith("p") and k.endswith("_ci") and iv:
            y = int(k[1:-3]) / 100
            ax.fill_between(iv, y - 0.012, y + 0.012, color="tab:red", alpha=0.35, lw=0,
                            label="95% interval" if y == 0.5 else None)


def write_plots(result, df, ts, out: Path, rates=None, rep: dict | None = None) -> list[Path]:
    """rep: the report, whose intervals are drawn as bands (latency percentiles, output throughput)."""
    paths = []
    online = df[df["job"] == ""]          # latency is online traffic's; batch jobs get their own plot
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, col, title in zip(axes, ("ttft_s", "tpot_s", "e2e_s"), ("TTFT", "TPOT", "E2E latency")):
        cdf(ax, online[col].to_numpy(dtype=float), title)
        if rep is not None:
            ci_bands(ax, rep["latency_ms"][col[:-2]])
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} CDF")
        ax.grid(True, which="both", alpha=0.3)
    paths.append(save(fig, out / "latency_cdf.png"))

    m = result.metrics
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    tok = m.tokens_per_bucket
    last = int(np.flatnonzero(tok).max()) + 1 if tok.any() else 1
    t = np.arange(last) * m.bucket_s
    a1.plot(t, tok[:last] / m.bucket_s, lw=0.8, label="output tokens/s")
    arr = np.bincount((df["arrival_s"].to_numpy() / m.bucket_s).astype(int), minlength=last)[:last]
    a1b = a1.twinx()
    a1b.plot(t, arr / m.bucket_s, color="tab:orange", lw=0.6, alpha=0.7, label="arrivals/s")
    a1.set_ylabel("output tokens/s")
    iv = (rep or {}).get("throughput", {}).get("output_tokens_per_s_ci")
    if iv:
        a1.axhspan(iv[0], iv[1], color="tab:blue", alpha=0.15, lw=0)
        a1.axhline(rep["throughput"]["output_tokens_per_s"], color="tab:blue", ls="--", lw=0.8,
                   label="run's mean, 95% interval")
        a1.legend(loc="upper left", fontsize=8)
    a1b.set_ylabel("arrivals/s", color="tab:orange")
    a1.set_title("Throughput over time")
    grid = np.arange(0, max(t[-1], m.bucket_s) + m.bucket_s, m.bucket_s)
    if len(ts):
        waiting = np.zeros_like(grid)
        running = np.zeros_like(grid)
        for _, g in ts.groupby("replica"):
            idx = np.searchsorted(g["t_s"].to_numpy(), grid, side="right") - 1
            ok = idx >= 0
            waiting[ok] += g["waiting"].to_numpy()[idx[ok]]
            running[ok] += g["running"].to_numpy()[idx[ok]]
        a2.plot(grid, waiting, lw=0.8, label="waiting")
        a2.plot(grid, running, lw=0.8, label="running")
    a2.set_ylabel("requests (all replicas)")
    a2.set_xlabel("simulated time (s)")
    a2.set_title("Queue length over time")
    a2.legend(loc="upper right")
    paths.append(save(fig, out / "throughput_queue.png"))

    fig, ax = plt.subplots(figsize=(11, 4))
    for rid, g in ts.groupby("replica"):
        ax.step(g["t_s"], 100 * g["kv_usage"], where="post", lw=0.8, label=f"replica {rid}")
    ax.set_ylabel("KV blocks in use (%)")
    ax.set_xlabel("simulated time (s)")
    ax.set_title("KV-cache usage per replica")
    ax.set_ylim(0, 100)
    if ts["replica"].nunique() <= 16:
        ax.legend(loc="upper right", ncol=4, fontsize=8)
    paths.append(save(fig, out / "kv_usage.png"))
    if rates is not None:
        paths.append(replica_series(ts, rates, out / "replicas_timeseries.png"))
    if result.autoscaling is not None:
        paths.append(autoscaling_plot(result.autoscaling, online, ts, out / "autoscaling.png"))
    if result.workload.job_specs:
        paths.append(batch_jobs_plot(result.workload.job_specs, df, out / "batch_jobs.png"))
    if result.faults is not None:
        paths.append(faults_plot(result, online, out / "faults.png"))
    return paths


def faults_plot(result, online, path: Path, bucket_s: float = 10.0) -> Path:
    """Replicas up, SLO attainment and TTFT (of online requests, by arrival) over time; faults shaded."""
    from .fault_report import down_intervals
    from .report import slo_met
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    end = result.sim_end
    n = len(result.replicas)
    down = [ab for iv in down_intervals(result, end).values() for ab in iv]
    edges = sorted({0.0, end} | {t for ab in down for t in ab})
    up = [n - sum(a <= t < b for a, b in down) for t in edges]
    a1.step(edges, up, where="post")
    a1.set_ylabel("replicas up")
    a1.set_ylim(0, n + 0.5)
    a1.set_title("Faults (shaded) and their impact")
    b = (online["arrival_s"] // bucket_s) * bucket_s
    met = slo_met(online, result.config).astype(float)
    att = met.groupby(b).mean()
    a2.plot(att.index, 100 * att.to_numpy(), lw=0.8)
    a2.set_ylabel(f"SLO attainment, % ({bucket_s:g} s)")
    q = (online["ttft_s"] * 1000).groupby(b).quantile([0.5, 0.99]).unstack()
    if len(q):
        a3.plot(q.index, q[0.5], label="TTFT p50", lw=0.8)
        a3.plot(q.index, q[0.99], label="TTFT p99", lw=0.8)
        a3.set_yscale("log")
        a3.legend(loc="upper right", fontsize=8)
    a3.set_ylabel("ms (by arrival)")
    a3.set_xlabel("simulated time (s)")
    colors = {"crash": "tab:red", "node_loss": "darkred", "straggler": "tab:orange", "network": "tab:purple"}
    for e in result.faults.events:
        for ax in (a1, a2, a3):
            ax.axvspan(e["t"], max(e.get("until", e["t"]), e["t"] + bucket_s / 10), color=colors[e["kind"]], alpha=0.15)
        a1.annotate(e["kind"], (e["t"], n + 0.1), fontsize=7, color=colors[e["kind"]])
    return save(fig, path)


def batch_jobs_plot(specs, df, path: Path, bucket_s: float = 30.0) -> Path:
    """Each job's share of requests done over time against its deadline; online TPOT (p50, p99 of requests
    arriving per bucket) below, to see what the batch work cost online traffic."""
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for k, s in enumerate(specs):
        done = np.sort(df.loc[(df["job"] == s.name) & (df["outcome"] == "finished"), "finish_s"].to_numpy(float))
        color = f"C{k % 10}"
        a1.step(np.concatenate(([s.submit_s], done)), np.arange(done.size + 1) / s.num_requests, where="post",
                color=color, label=s.name)
        a1.axvline(s.deadline_s, color=color, ls="--", lw=0.8)
    a1.set_ylabel("requests done (share of the job)")
    a1.set_ylim(0, 1.02)
    a1.set_title("Batch jobs: progress against deadlines (dashed)")
    a1.legend(loc="lower right", fontsize=8)
    online = df[df["job"] == ""]
    b = (online["arrival_s"] // bucket_s) * bucket_s
    q = (online["tpot_s"] * 1000).groupby(b).quantile([0.5, 0.99]).unstack()
    if len(q):
        a2.plot(q.index, q[0.5], label="online TPOT p50")
        a2.plot(q.index, q[0.99], label="online TPOT p99")
        a2.legend(loc="upper right", fontsize=8)
    a2.set_ylabel("ms (by arrival)")
    a2.set_xlabel("simulated time (s)")
    return save(fig, path)


def autoscaling_plot(a: dict, df, ts, path: Path, bucket_s: float = 30.0) -> Path:
    """Replicas by state, the fleet's queue, and TTFT (p50, p99 of requests arriving per bucket) over time."""
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    tl = a["timeline"]
    t = [0.0] + [r["t"] for r in tl]
    for key, label in (("active", "active"), ("starting", "starting (cold start)"), ("warm", "warm standby"),
                       ("draining", "draining")):
        first = tl[0][key] if tl else 0
        a1.step(t, [first] + [r[key] for r in tl], where="post", label=label)
    for e in a["events"]:
        if e["to"] == "starting":
            a1.axvline(e["t"], color="grey", lw=0.5, alpha=0.4)
    a1.set_ylabel("replicas")
    a1.legend(loc="upper right", fontsize=8)
    a1.set_title(f"Autoscaling (cold start {a['cold_start_s']:.0f} s)")
    if len(ts):
        grid = np.arange(0, ts["t_s"].max() + bucket_s / 10, bucket_s / 10)
        waiting = np.zeros_like(grid)
        for _, g in ts.groupby("replica"):
            idx = np.searchsorted(g["t_s"].to_numpy(), grid, side="right") - 1
            ok = idx >= 0
            waiting[ok] += g["waiting"].to_numpy()[idx[ok]]
        a2.plot(grid, waiting, lw=0.8)
    a2.set_ylabel("queued requests")
    b = (df["arrival_s"] // bucket_s) * bucket_s
    q = (df["ttft_s"] * 1000).groupby(b).quantile([0.5, 0.99]).unstack()
    if len(q):
        a3.plot(q.index, q[0.5], label="TTFT p50")
        a3.plot(q.index, q[0.99], label="TTFT p99")
        a3.set_yscale("log")
    a3.set_ylabel("ms (by arrival)")
    a3.set_xlabel("simulated time (s)")
    a3.legend(loc="upper right", fontsize=8)
    return save(fig, path)


def replica_series(ts, rates, path: Path, max_lines: int = 16) -> Path:
    """Per replica over time: queue, running batch, KV usage (sampled), output tokens/s and SLO attainment
    (per 1 s bucket). With many replicas, the max_lines busiest (most output tokens) are drawn."""
    busiest = rates.groupby("replica")["output_tokens_per_s"].sum().sort_values(ascending=False).index[:max_lines]
    fig, axes = plt.subplots(5, 1, figsize=(11, 12), sharex=True)
    panels = ((ts, "waiting", "queued requests"), (ts, "running", "running batch"), (ts, "kv_usage", "KV usage"),
              (rates, "output_tokens_per_s", "output tokens/s"), (rates, "slo_attainment", "SLO attainment"))
    for ax, (table, col, label) in zip(axes, panels):
        for rid in sorted(busiest):
            g = table[table["replica"] == rid]
            if table is ts:
                ax.step(g["t_s"], g[col], where="post", lw=0.7, label=f"replica {rid}")
            else:
                ax.plot(g["t_s"], g[col], lw=0.7, marker="." if col == "slo_attainment" else None, ms=2,
                        label=f"replica {rid}")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="upper right", ncol=4, fontsize=7)
    axes[-1].set_xlabel("simulated time (s)")
    return save(fig, path, "Per-replica time series")
