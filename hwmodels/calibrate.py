"""`servesim calibrate --backend numpy|torch`: microbenchmark this machine and fit a device profile.

The device's "datasheet" is measured: peak = the best GEMM FLOP/s seen, bandwidth = the best large-copy
bytes/s seen. Then the same op-class fit as for the reference kernels (fit.py) runs over the measured
points (GEMM sweep, causal attention prefill and decode, elementwise passes). The profile file defines
the device (so `gpu: <name>` works in configs and `servesim estimate`) and its fitted classes, and keeps
the raw measurements with the machine, software versions and date.

Timing: each point is run `warmup` times untimed, then `repeats` times; the median wall time is kept
(torch on CUDA synchronizes before reading the clock). numpy has no bf16: the numpy backend measures
float32 and says so in the profile; weights in the simulator stay in the configured dtype.
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from servesim.sim.errors import ConfigError

from .catalog import user_profile_dir
from .fit import _fit_ops, _predict
from .ops import attention, gemm

GEMM_SHAPES = [(m, n, k) for m in (1, 16, 64, 256, 1024) for n, k in ((1024, 1024), (4096, 1024), (1024, 4096))]
PREFILL = [(b, s) for b in (1, 4) for s in (64, 256, 1024)]          # (batch, seq)
DECODE = [(b, c) for b in (1, 16) for c in (128, 1024, 4096)]         # (batch, cached)
HEADS, KV_HEADS, HEAD_DIM = 8, 8, 64   # MHA: the naive kernel reads one K and V per query head
COPY_MB = (1, 8, 64, 256)


class _Backend:
    def __init__(self, name: str, device: str):
        self.name, self.device = name, device
        if name == "numpy":
            if device != "cpu":
                raise ConfigError("the numpy backend runs on the CPU only (--device cpu)")
            self.xp, self.dtype, self.bytes = np, np.float32, 4
        elif name == "torch":
            try:
                import torch
            except ImportError:
                raise ConfigError("the torch backend needs torch: pip install 'servesim[torch]' (or torch itself)") from None
            if device == "cuda" and not torch.cuda.is_available():
                raise ConfigError("--device cuda: torch sees no CUDA device")
            self.torch, self.xp = torch, torch
            self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
            self.bytes = 2 if device == "cuda" else 4
        else:
            raise ConfigError(f"unknown backend {name!r}; use numpy or torch")

    def randn(self, *shape):
        if self.name == "numpy":
            return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        return self.torch.randn(*shape, dtype=self.dtype, device=self.device)

    def sync(self):
        if self.name == "torch" and self.device == "cuda":
            self.torch.cuda.synchronize()

    def versions(self) -> dict:
        v = {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
             "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
        if self.name == "torch":
            v["torch"] = str(self.torch.__version__)
            if self.device == "cuda":
                v["gpu"] = str(self.torch.cuda.get_device_name())
                v["cuda"] = str(self.torch.version.cuda)
        return v


def _time(be: _Backend, fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    be.sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        be.sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _attention_fn(be: _Backend, b: int, new: int, cached: int):
    xp = be.xp
    L = cached + new
    q = be.randn(b, HEADS, new, HEAD_DIM)
    k = be.randn(b, HEADS, L, HEAD_DIM)      # GQA keys expanded to the query heads, as a naive kernel would
    v = be.randn(b, HEADS, L, HEAD_DIM)
    scale = 1.0 / HEAD_DIM ** 0.5
    mask = None
    if new > 1:
        i = np.arange(new)[:, None] + cached
        j = np.arange(L)[None, :]
        m = np.where(j > i, -1e30, 0.0).astype(np.float32)
        mask = m if be.name == "numpy" else be.torch.tensor(m, dtype=be.dtype, device=be.device)

    def run():
        s = xp.matmul(q, k.swapaxes(-1, -2) if be.name == "numpy" else k.transpose(-1, -2)) * scale
        if mask is not None:
            s = s + mask
        s = s - s.max(-1, keepdims=True) if be.name == "numpy" else s - s.amax(-1, keepdim=True)
        p = xp.exp(s)
        p = p / (p.sum(-1, keepdims=True) if be.name == "numpy" else p.sum(-1, keepdim=True))
        return xp.matmul(p, v)
    return run


def measure(backend: str = "numpy", device: str = "cpu", warmup: int = 2, repeats: int = 5, progress=None) -> pd.DataFrame:
    be = _Backend(backend, device)
    rows = []

    def add(**kw):
        rows.append({**kw, "elem_bytes": be.bytes})
        if progress:
            progress(len(rows))

    for mb in COPY_MB:
        n = mb * 1024 * 1024 // be.bytes
        a, c = be.randn(n), be.randn(n)
        fn = (lambda a=a, c=c: np.copyto(c, a)) if be.name == "numpy" else (lambda a=a, c=c: c.copy_(a))
        t = _time(be, fn, warmup, repeats)
        add(op="copy", cls="copy", m=0, n=0, k=0, batch=0, new=0, cached=0, flops=0.0, nbytes=2.0 * n * be.bytes, seconds=t)
    for m, n, k in GEMM_SHAPES:
        a, w = be.randn(m, k), be.randn(k, n)
        t = _time(be, lambda a=a, w=w: be.xp.matmul(a, w), warmup, repeats)
        f, b = gemm(m, n, k, be.bytes, be.bytes, be.bytes)
        add(op="gemm", cls="gemm", m=m, n=n, k=k, batch=0, new=0, cached=0, flops=f, nbytes=b, seconds=t)
    for kind, shapes in (("attn_prefill", PREFILL), ("attn_decode", DECODE)):
        for bsz, x in shapes:
            new, cached = (x, 0) if kind == "attn_prefill" else (1, x)
            t = _time(be, _attention_fn(be, bsz, new, cached), warmup, repeats)
            f, b = attention(new, cached, HEADS, KV_HEADS, HEAD_DIM, be.bytes, be.bytes)
            add(op=kind, cls=kind, m=0, n=0, k=0, batch=bsz, new=new, cached=cached, flops=bsz * f,
                nbytes=bsz * b, seconds=t)
    for tokens in (1, 64, 512, 4096):
        x = be.randn(tokens, 1024)
        t = _time(be, lambda x=x: x * 1.0001 + x, warmup, repeats)
        add(op="add", cls="add", m=0, n=0, k=0, batch=0, new=tokens, cached=0, flops=0.0,
            nbytes=3.0 * tokens * 1024 * be.bytes, seconds=t)
    return pd.DataFrame(rows)


def fit_device(raw: pd.DataFrame, name: str, backend: str, device: str, versions: dict) -> dict:
    """Profile document: the measured device and its fitted op classes. A device measured in float32 (numpy,
    torch on CPU) gets an fp32 peak too, so `dtype: fp32` prices it as measured."""
    be_fp32 = int(raw["elem_bytes"].iloc[0]) == 4
    from .catalog import GPU
    peak = float((raw.loc[raw["cls"] == "gemm", "flops"] / raw.loc[raw["cls"] == "gemm", "seconds"]).max())
    bw = float((raw.loc[raw["cls"] == "copy", "nbytes"] / raw.loc[raw["cls"] == "copy", "seconds"]).max())
    dev = GPU(name=name, memory_bytes=_memory_bytes(), mem_bw=bw, bf16_flops=peak, fp8_flops=None, link_bw=None,
              usd_per_hour=None, compute_efficiency=1.0, memory_efficiency=1.0, kernel_floor_s=1e-6,
              source=f"measured by servesim calibrate --backend {backend} --device {device}")
    classes = {}
    for cls, g in raw[raw["cls"].isin(["gemm", "attn_prefill", "attn_decode", "add"])].groupby("cls"):
        g = g.assign(latency_us=g["seconds"] * 1e6, num_kv_heads=HEADS, head_dim=HEAD_DIM,
                     num_heads=HEADS, seqs=[[(r.new, r.cached)] * int(r.batch) if cls.startswith("attn") else None
                                            for r in g.itertuples()])
        p = _fit_ops(g, cls, dev)
        ape = np.abs(_predict(cls, p, g, dev) / g["seconds"].to_numpy() - 1)
        classes[cls] = {"compute_efficiency": round(p.compute_efficiency, 4),
                        "memory_efficiency": round(p.memory_efficiency, 4),
                        "compute_offset_us": round(p.compute_offset_s * 1e6, 4),
                        "memory_offset_us": round(p.memory_offset_s * 1e6, 4),
                        **({"seq_overhead": round(p.seq_overhead, 3)} if cls.startswith("attn") else {}),
                        "rows": int(len(g)), "median_ape_pct": round(100 * float(np.median(ape)), 2),
                        "p90_ape_pct": round(100 * float(np.percentile(ape, 90)), 2)}
    # classes not benchmarked (norm, rope, act) are memory-bound passes like `add`
    for cls in ("norm", "rope", "act"):
        classes[cls] = {**classes["add"], "note": "not measured: copied from add"}
    return {
        "source": f"servesim calibrate --backend {backend} --device {device}",
        "method": "median of repeated timings after warm-up; peak = best GEMM FLOP/s, bandwidth = best copy "
                  "bytes/s; op classes fitted as in fit.py",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "devices": {name: {"memory_gb": round(dev.memory_bytes / 1024**3, 2), "mem_bw_tbps": bw / 1e12,
                           "bf16_tflops": peak / 1e12, "compute_efficiency": 1.0,
                           **({"fp32_tflops": peak / 1e12} if be_fp32 else {}), "memory_efficiency": 1.0,
                           "kernel_floor_us": 1.0, "usd_per_hour": None,
                           "precision_note": "numpy measures float32" if backend == "numpy" else f"torch {device}",
                           "source": f"measured by servesim calibrate on this machine ({versions.get('processor')})"}},
        "gpus": {name: classes},
        "measurements": raw.to_dict(orient="records"),
    }


def _memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 1024**3


def calibrate(backend: str, device: str, name: str | None, out: Path | None, repeats: int = 5,
              warmup: int = 2) -> tuple[Path, dict]:
    be = _Backend(backend, device)
    name = name or f"local-{device}-{backend}"
    raw = measure(backend, device, warmup=warmup, repeats=repeats)
    doc = fit_device(raw, name, backend, device, be.versions())
    path = out or user_profile_dir() / f"{name}.yaml"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Device profile written by servesim calibrate; see hwmodels/calibrate.py.\n"
                        + yaml.safe_dump(doc, sort_keys=False, width=120))
    except OSError as e:
        raise ConfigError(f"cannot write the profile to {path}: {e}") from None
    from .catalog import _get_gpu, _profile_documents
    _profile_documents.cache_clear()        # the new device is visible to this process at once
    _get_gpu.cache_clear()
    return path, doc
