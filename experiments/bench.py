"""`make bench`: time whole `servesim run` processes on the benchmark configs and print a table.

Each config runs `--repeat` times (default 3) in a fresh process; the table shows the median.
Process wall time includes start-up, trace loading and report writing; sim wall is the event loop. Peak RSS
is the whole process's (the report's sim.peak_rss_mb stops at the end of the event loop).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs" / "bench"
# the million-request benchmark takes minutes a run: once by default (the table says how many runs)
MAX_REPEAT = {"azure_conv_1m_64replicas": 1}


def run_once(cfg: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "servesim.sim.cli", "run", str(cfg), "-o", str(out), "--quiet",
                              "--no-plots"])
    _, status, usage = os.wait4(child.pid, 0)      # this child's own peak RSS, report writing included
    wall = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, child.args)
    rep = json.loads((out / "report.json").read_text())
    return {"process_s": wall, "sim_s": rep["sim"]["wall_s"], "requests": rep["requests"]["total"],
            "iterations": rep["sim"]["iterations"], "events": rep["sim"]["events"],
            "rss_mb": usage.ru_maxrss / 1024.0}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("configs", nargs="*", type=Path, help="default: every experiments/configs/bench/*.yaml")
    args = ap.parse_args(argv)
    configs = args.configs or sorted(CONFIGS.glob("*.yaml"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in configs:
            n = min(args.repeat, MAX_REPEAT.get(cfg.stem, args.repeat))
            runs = [run_once(cfg, Path(tmp) / f"{cfg.stem}_{i}") for i in range(n)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            med["runs"] = n
            rows.append((cfg.stem, med))
    head = f"{'config':34s} {'runs':>4s} {'process s':>10s} {'sim s':>8s} {'requests':>9s} {'req/wall-s':>11s} " \
           f"{'iters':>10s} {'iters/s':>9s} {'events/s':>9s} {'peak RSS MB':>12s}"
    print(f"median of the runs of each config ({args.repeat} unless fewer are shown)")
    print(head)
    print("-" * len(head))
    for name, m in rows:
        print(f"{name:34s} {m['runs']:4d} {m['process_s']:10.2f} {m['sim_s']:8.2f} {m['requests']:9.0f} "
              f"{m['requests'] / m['process_s']:11.0f} {m['iterations']:10.0f} {m['iterations'] / m['sim_s']:9.0f} "
              f"{m['events'] / m['sim_s']:9.0f} {m['rss_mb']:12.0f}")


if __name__ == "__main__":
    main()
