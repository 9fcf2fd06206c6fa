"""Writes the three notebooks (run once; the .ipynb files are the source)."""
import nbformat as nbf
from pathlib import Path

HEAD = '''import os
from pathlib import Path
import tempfile

import pandas as pd
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

import servesim.experiments as experiments

CONFIGS = Path(experiments.__file__).parent / "configs"      # the configs shipped with servesim
OUT = Path(os.environ.get("SERVESIM_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="servesim-"))
print("writing to", OUT)'''


def nb(cells):
    n = nbf.v4.new_notebook()
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    n.cells = [nbf.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbf.v4.new_code_cell(c) for c in cells]
    return n


quick = nb([
    "md:# servesim quickstart\n\nReplay 10 minutes of the Azure LLM inference 2023 conversation trace on 4 replicas of "
    "Llama-3.1-8B on H100, read the latency percentiles, SLO attainment and cost, and plot the TTFT distribution. "
    "The same as `servesim run experiments/configs/quickstart.yaml`, from Python.",
    HEAD,
    '''from servesim.sim.config import load_config
from servesim.sim.run import simulate
from servesim.sim.report import write_outputs

cfg, base = load_config(CONFIGS / "quickstart.yaml", ["workload.duration_s=600", "output.plots=false"])
result = simulate(cfg, base)
report = write_outputs(result, OUT / "quickstart", plots=False)
print(f"{report['requests']['finished']} requests in {result.wall_s:.1f} s of wall time")''',
    '''pd.DataFrame({k: report["latency_ms"][k] for k in ("ttft", "tpot", "e2e")}).round(1)''',
    '''pd.Series({"SLO attainment": report["slo"]["attainment"],
           "requests/s": report["throughput"]["requests_per_s"],
           "output tokens/s": report["throughput"]["output_tokens_per_s"],
           "$ per 1M output tokens": report["cost"]["usd_per_1m_output_tokens"],
           "MBU": report["utilization"]["mbu"]}).round(3)''',
    '''requests = pd.read_csv(OUT / "quickstart" / "requests.csv")
ttft = requests["ttft_s"].dropna().sort_values() * 1000
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(ttft, [i / len(ttft) for i in range(1, len(ttft) + 1)])
ax.set_xscale("log"); ax.set_xlabel("TTFT (ms)"); ax.set_ylabel("fraction of requests")
assert report["requests"]["finished"] == len(requests) > 1000''',
])

sweep = nb([
    "md:# A policy sweep\n\nRouting policy x load on the quickstart fleet, 10 minutes of the Azure conversation trace "
    "each. `servesim sweep` runs the points in parallel (or on Ray with `executor=\"ray\"`), resumes where it "
    "stopped, and returns one tidy table.",
    HEAD,
    '''import yaml
from servesim.experiments.sweep import run_sweep

spec = {"name": "routing_x_load", "base": str(CONFIGS / "quickstart.yaml"),
        "grid": {"policies.routing.name": ["round_robin", "least_outstanding"],
                 "workload.rate_scale": [1.0, 3.0], "workload.duration_s": [600]},
        "seeds": [0]}
(OUT / "sweep.yaml").write_text(yaml.safe_dump(spec))
table, ran = run_sweep(OUT / "sweep.yaml", OUT / "sweep", jobs=2, progress=False)
print(f"{ran} points run; {len(table)} in the table")''',
    '''cols = ["policies.routing.name", "workload.rate_scale", "latency_ms.ttft.p50", "latency_ms.ttft.p99",
        "latency_ms.tpot.p99", "slo.attainment"]
table[cols].round(2)''',
    '''pivot = table.pivot(index="workload.rate_scale", columns="policies.routing.name", values="latency_ms.ttft.p99")
pivot.plot.bar(figsize=(6, 3.5), ylabel="p99 TTFT (ms)", rot=0)
assert (table["status"] == "ok").all() and len(table) == 4''',
    "md:Running the cell above again runs nothing: every point's folder is complete.",
    '''_, again = run_sweep(OUT / "sweep.yaml", OUT / "sweep", jobs=2, progress=False)
assert again == 0
again''',
])

plan = nb([
    "md:# A capacity plan\n\nHow many GPUs of each kind serve 10 minutes of the Azure conversation trace at 4x its "
    "rate with 99% of requests at TTFT <= 2 s and TPOT <= 50 ms? `servesim plan` searches the replica count of each "
    "candidate (doubling, then bisection) and prices the cheapest fleet that meets the targets.",
    HEAD,
    '''import yaml
from servesim.experiments.plan import run_plan

spec = {"name": "plan", "base": str(CONFIGS / "quickstart.yaml"),
        "workload": {"kind": "trace", "path": "bundled:azure_conv_2023.csv.gz", "rate_scale": 4.0, "duration_s": 600},
        "targets": {"attainment": 0.99, "ttft_ms": 2000, "tpot_ms": 50},
        "max_replicas": 16,
        "candidates": [{"name": "h100", "gpu": "H100-SXM", "model": "meta-llama/Llama-3.1-8B"},
                       {"name": "l40s", "gpu": "L40S", "model": "meta-llama/Llama-3.1-8B"}]}
(OUT / "plan.yaml").write_text(yaml.safe_dump(spec))
table, evaluated = run_plan(OUT / "plan.yaml", OUT / "plan", jobs=2)
table[["candidate", "replicas", "gpus", "usd_per_hour", "usd_per_1m_output_tokens", "ttft_p99_ms", "tpot_p99_ms"]]''',
    '''evaluated[["candidate", "replicas", "attainment", "ttft_p99_ms", "usd_per_hour", "meets"]]''',
    "md:What if traffic doubles?",
    '''doubled, _ = run_plan(OUT / "plan.yaml", OUT / "plan_2x", jobs=2, rate_scale=2.0)
assert (doubled["replicas"].to_numpy() >= table.set_index("candidate").loc[doubled["candidate"], "replicas"].to_numpy()).all()
doubled[["candidate", "replicas", "usd_per_hour"]]''',
    '''from IPython.display import Image
Image(filename=str(OUT / "plan" / "pareto.png"))''',
])

for name, n in (("quickstart", quick), ("policy_sweep", sweep), ("capacity_plan", plan)):
    nbf.write(n, f"/work/main/notebooks/{name}.ipynb")
