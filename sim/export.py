"""A run's tables as CSV files, per-replica rates over time, and its time series as Prometheus text exposition
(metrics.prom), so a serving team can load a simulated run next to their production dashboards' series."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """df as CSV, by Arrow's writer: pandas' to_csv formats every float in Python (about 20 s for a million
    requests' rows; Arrow, a tenth of that). Floats keep their shortest round-trip digits (an integral one
    without ".0"), string values are quoted (header names are not), booleans are true/false, missing values
    empty: pd.read_csv reads back what pandas would have written, but an all-integral float column as ints."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    pacsv.write_csv(pa.Table.from_pandas(df, preserve_index=False), str(path),
                    pacsv.WriteOptions(quoting_style="needed", quoting_header="none"))


def replica_rates(result, df: pd.DataFrame, met: pd.Series) -> pd.DataFrame:
    """One row per replica and bucket (metrics.bucket_s, 1 s): output tokens/s sampled there, requests that
    finished there and the share of them that met their SLO class."""
    m = result.metrics
    width = m.bucket_s
    n_rep = m.replica_tokens.shape[0]
    last = int(result.sim_end / width) + 1
    tokens = np.zeros((n_rep, last), dtype=np.int64)
    have = min(last, m.replica_tokens.shape[1])
    tokens[:, :have] = m.replica_tokens[:, :have]
    fin = (df["outcome"] == "finished").to_numpy() & (df["replica"] >= 0).to_numpy()  # cached answers: no replica
    rep = df["replica"].to_numpy()[fin].astype(np.int64)
    bucket = np.minimum((df["finish_s"].to_numpy(dtype=float)[fin] // width).astype(np.int64), last - 1)
    finished = np.zeros((n_rep, last), dtype=np.int64)
    ok = np.zeros((n_rep, last), dtype=np.int64)
    np.add.at(finished, (rep, bucket), 1)
    np.add.at(ok, (rep, bucket), met.to_numpy(dtype=bool)[fin].astype(np.int64))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(finished > 0, ok / np.maximum(finished, 1), np.nan)
    return pd.DataFrame({"replica": np.repeat(np.arange(n_rep), last), "t_s": np.tile(np.arange(last) * width, n_rep),
                         "output_tokens_per_s": (tokens / width).ravel(), "finished": finished.ravel(),
                         "slo_met": ok.ravel(), "slo_attainment": share.ravel()})


SERIES = (  # (metric, help, table, column)
    ("servesim_waiting_requests", "Requests waiting in the replica's queue (sampled)", "ts", "waiting"),
    ("servesim_running_requests", "Requests admitted and running on the replica (sampled)", "ts", "running"),
    ("servesim_kv_usage_ratio", "Fraction of the replica's KV blocks referenced (sampled)", "ts", "kv_usage"),
    ("servesim_output_tokens_per_second", "Output tokens sampled per second, per 1 s bucket", "rates",
     "output_tokens_per_s"),
    ("servesim_slo_attainment_ratio", "Share of requests finishing in the bucket that met their SLO", "rates",
     "slo_attainment"),
)


def prometheus_text(ts: pd.DataFrame, rates: pd.DataFrame) -> str:
    """Text exposition format 0.0.4: every sample with its replica label and its simulated time (ms)."""
    tables = {"ts": ts, "rates": rates}
    out = []
    for name, help_, table, col in SERIES:
        d = tables[table]
        d = d[d[col].notna()]
        out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
        out += [f'{name}{{replica="{int(r)}"}} {float(v)!r} {int(round(t * 1000))}'
                for r, v, t in zip(d["replica"], d[col], d["t_s"])]
    return "\n".join(out) + "\n"
