"""`servesim calibrate --backend numpy|torch`: microbenchmark this machine and fit a device profile.

The device's "datasheet" is measured: peak = the best GEMM FLOP/s seen, bandwidth = the best large-copy
bytes/s seen. Then the same op-class fit as for the reference kernels (fit.py) runs over the measured
points: a GEMM sweep, and the measured backend's own kernels (hwmodels/measured.py: GQA attention for
prefill and decode, RMSNorm, RoPE, SwiGLU, residual add), so a roofline priced on this profile and the
measured backend time the same code. The profile file defines the device (so `gpu: <name>` works in
configs and `servesim estimate`) and its fitted classes, and keeps the raw measurements with the
machine, software versions and date.

Timing: each point is run `warmup` times untimed, then `repeats` times; the median wall time is kept
(torch on CUDA synchronizes before reading the clock). GEMM operands are cycled over copies (cold
weights, as a forward pass reads them); attention and the small passes run right after a different
kernel. The attention classes are fitted as naive kernels (the backend materializes the score square). numpy has no bf16: the numpy backend measures
float32 and says so in the profile (and gives the device an fp32 peak: use `dtype: fp32`).
"""
from __future__ import annotations

import datetime as dt
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from servesim.sim.errors import ConfigError

from .catalog import user_profile_dir
from .fit import _entry, _fit_ops, _predict
from .ops import attention, gemm

# m = 1 is timed on its own class (gemv): BLAS libraries run it as a GEMV, without packing the weights
GEMM_SHAPES = [(m, n, k) for m in (1, 2, 4, 8, 16, 64, 256, 1024)
               for n, k in ((1024, 1024), (4096, 1024), (1024, 4096), (768, 512), (512, 1536), (3072, 512),
                            (512, 512), (8192, 512))]
PREFILL = [(b, s) for b in (1, 4) for s in (64, 256, 1024)]          # (batch, seq)
DECODE = [(b, c) for b in (1, 16) for c in (128, 1024, 4096)]         # (batch, cached)
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64   # GQA, as the measured backend's tiny-llama
COPY_MB = (1, 8, 64, 256)
TOKENS = (1, 64, 512, 2048)            # rows of the elementwise passes, hidden size 512


def _backend(name: str, device: str):
    from .measured import BACKENDS
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; use {' or '.join(BACKENDS)}")
    return BACKENDS[name](device, 0)


ROTATE_BYTES = 64 * 1024 * 1024   # operands cycled per point: more than a core's caches hold


def _time(be, fns, warmup: int, repeats: int, between=None) -> float:
    """Median seconds of one call. `fns` is a list of closures over distinct copies of the operands, called
    in turn, so a timed call finds its weights out of the core's caches as in a forward pass (which reads
    each layer's weights once per step), not warm from the previous repetition. Every copy is used `warmup`
    times first, and the timed calls go round the copies at least three times. `between` runs untimed
    before each timed call: in a forward pass every kernel follows a different one (a projection GEMM
    evicts what a small elementwise pass or an attention over a short cache would otherwise find warm),
    never a copy of itself. GEMMs need no neighbour: their rotated weights are cold already."""
    fns = fns if isinstance(fns, list) else [fns]
    for j in range(warmup * len(fns)):
        fns[j % len(fns)]()
    be.sync()
    out = []
    for j in range(max(repeats, 3 * len(fns))):    # several passes over the copies, not a first touch of each
        if between is not None:
            between()
            be.sync()
        t0 = time.perf_counter()
        fns[j % len(fns)]()
        be.sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _copies(nbytes: float, limit: int = 16) -> int:
    return int(min(limit, max(1, -(-ROTATE_BYTES // max(nbytes, 1)))))


def measure(backend: str = "numpy", device: str = "cpu", warmup: int = 2, repeats: int = 5, progress=None) -> pd.DataFrame:
    """Time copies, GEMMs, and the measured backend's own kernels (attention, RMSNorm, RoPE, SwiGLU, add)."""
    from .measured import cache_and_attend, rope, swiglu
    be = _backend(backend, device)
    eb = be.elem_bytes
    rows = []

    def add(**kw):
        base = dict(op=kw["cls"], m=0, n=0, k=0, batch=0, new=0, cached=0, flops=0.0)
        rows.append({**base, **kw, "elem_bytes": eb})
        if progress:
            progress(len(rows))

    x_other, w_other = be.randn(1, 512), be.randn(512, 3072)        # a layer's gate/up projection, one token
    other = (lambda: x_other @ w_other)
    for mb in COPY_MB:
        n = mb * 1024 * 1024 // eb
        a, c = be.randn(n), be.randn(n)
        fn = (lambda a=a, c=c: np.copyto(c, a)) if be.name == "numpy" else (lambda a=a, c=c: c.copy_(a))
        add(cls="copy", nbytes=2.0 * n * eb, seconds=_time(be, fn, warmup, repeats))
    for m, n, k in GEMM_SHAPES:
        f, b = gemm(m, n, k, eb, eb, eb)
        fns = [(lambda a=be.randn(m, k), w=be.randn(k, n): a @ w) for _ in range(_copies(b))]
        add(cls="gemv" if m == 1 else "gemm", m=m, n=n, k=k, flops=f, nbytes=b,
            seconds=_time(be, fns, warmup, repeats))      # cold by rotation already: no neighbour
    scale = HEAD_DIM ** -0.5
    for kind, shapes in (("attn_prefill", PREFILL), ("attn_decode", DECODE)):
        for bsz, x in shapes:
            new, cached = (x, 0) if kind == "attn_prefill" else (1, x)
            f, b = attention(new, cached, HEADS, KV_HEADS, HEAD_DIM, eb, eb)
            fns = []
            for _ in range(_copies(bsz * b, limit=8)):
                seqs = [(be.randn(new, HEADS, HEAD_DIM), be.randn(new, KV_HEADS, HEAD_DIM),
                         be.randn(KV_HEADS, cached + new, HEAD_DIM), be.randn(KV_HEADS, cached + new, HEAD_DIM))
                        for _ in range(bsz)]
                fns.append(lambda seqs=seqs, cached=cached: [cache_and_attend(be, q, kv, kv, kc, vc, cached, scale)
                                                             for q, kv, kc, vc in seqs])
            add(cls=kind, batch=bsz, new=new, cached=cached, flops=bsz * f, nbytes=bsz * b,
                seconds=_time(be, fns, warmup, repeats, other))
    h, i = 512, 1536
    for T in TOKENS:
        x, y, g = be.randn(T, h), be.randn(T, h), be.randn(h)
        q = be.randn(T, HEADS + KV_HEADS, HEAD_DIM)
        cos, sin = be.randn(T, HEAD_DIM // 2), be.randn(T, HEAD_DIM // 2)
        gu = be.randn(T, 2 * i)
        # bytes as the roofline counts them for each class (hwmodels/roofline.py)
        for cls, fn, nbytes in (("add", lambda x=x, y=y: x + y, 3 * T * h * eb),
                                ("norm", lambda x=x, g=g: be.rmsnorm(x, g), 2 * T * h * eb),
                                ("rope", lambda q=q, c=cos, s=sin: rope(be, q, c, s), 2 * T * (HEADS + KV_HEADS) * HEAD_DIM * eb),
                                ("act", lambda gu=gu: swiglu(be, gu), 3 * T * i * eb)):
            add(cls=cls, new=T, nbytes=float(nbytes), seconds=_time(be, fn, warmup, repeats, other))
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
    for cls, g in raw[raw["cls"].isin(["gemm", "gemv", "attn_prefill", "attn_decode", "add", "norm", "rope", "act"])].groupby("cls"):
        g = g.assign(latency_us=g["seconds"] * 1e6, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                     num_heads=HEADS, seqs=[[(r.new, r.cached)] * int(r.batch) if cls.startswith("attn") else None
                                            for r in g.itertuples()])
        naive = cls.startswith("attn")          # measured.attend materializes the score matrix
        p = _fit_ops(g, cls, dev, naive)
        pred = _predict(cls, p, g, dev)
        ape = np.abs(pred / g["seconds"].to_numpy() - 1)
        classes[cls] = {**_entry(cls, p), "rows": int(len(g)), "median_ape_pct": round(100 * float(np.median(ape)), 2),
                        "p90_ape_pct": round(100 * float(np.percentile(ape, 90)), 2),
                        # log(measured / predicted) of each row: the model-error draws (hwmodels/model_error.py)
                        "log_residuals": [round(float(x), 5) for x in np.log(g["seconds"].to_numpy() / pred)]}
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
    from .measured import versions
    be = _backend(backend, device)
    name = name or f"local-{device}-{backend}"
    raw = measure(backend, device, warmup=warmup, repeats=repeats)
    doc = fit_device(raw, name, backend, device, versions(be))
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
