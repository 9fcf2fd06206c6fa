"""Measured step times: each scheduled batch really runs through a decoder-only transformer.

`MeasuredModel` sits behind the same seam as the roofline model (step_time(BatchShape) -> StepTime), but
executes the step: a Llama-shaped model of the configured architecture (RMSNorm, RoPE, GQA attention,
SwiGLU MLP) with random weights, one forward pass over the batch's prefill chunks and decode tokens, and
a real per-request KV cache that grows with every computed token, starts from the prefix-cache hits the
scheduler reports and is dropped when the scheduler frees the request (finish or preemption).

What is timed: only the forward pass (embedding lookup to sampled token ids), with time.perf_counter
around it and, on CUDA, a synchronize before each clock read. Not timed: growing the KV arrays, filling
prefix hits, building position and row indices, and the simulator's own bookkeeping. The first
`warmup_steps` steps run twice and report the second timing (first-touch page faults, BLAS thread start,
CUDA kernel selection).

Backends: numpy (float32, CPU; always available) and torch (float32 on CPU, bf16 on CUDA; optional).
Timing does not depend on weight values, so weights are drawn once from a seeded generator.
"""
from __future__ import annotations

import os
import platform
import time

import numpy as np

from servesim.sim.errors import ConfigError

from .catalog import ModelSpec
from .step_time import BatchShape, StepTime


class _Numpy:
    name, elem_bytes = "numpy", 4

    def __init__(self, device: str, seed: int):
        if device != "cpu":
            raise ConfigError("the numpy backend runs on the CPU only (device: cpu)")
        self.device = device
        self.rng = np.random.default_rng(seed)

    def randn(self, *shape, scale=1.0):
        return (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))

    def zeros(self, *shape):
        return np.zeros(shape, dtype=np.float32)

    def asarray(self, a):
        return np.asarray(a)

    def cat(self, xs, axis=0):
        return np.concatenate(xs, axis=axis)

    def softmax(self, s):
        s = s - s.max(-1, keepdims=True)
        p = np.exp(s)
        return p / p.sum(-1, keepdims=True)

    def rmsnorm(self, x, g):
        return x * (1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)) * g

    def silu(self, x):
        return x / (1.0 + np.exp(-x))

    def argmax(self, x):
        return x.argmax(-1)

    def tr(self, x):
        return x.swapaxes(-1, -2)

    def perm(self, x, axes):
        return x.transpose(axes)

    def sync(self):
        pass


class _Torch:
    name = "torch"

    def __init__(self, device: str, seed: int):
        try:
            import torch
        except ImportError:
            raise ConfigError("the torch backend needs torch: pip install 'servesim[torch]' (or torch itself)") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda: torch sees no CUDA device")
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"device {device!r} is not cpu or cuda")
        self.t, self.device = torch, device
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.elem_bytes = 2 if device == "cuda" else 4
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(self, *shape, scale=1.0):
        return (self.t.randn(*shape, generator=self.gen) * scale).to(self.device, self.dtype)

    def zeros(self, *shape):
        return self.t.zeros(*shape, dtype=self.dtype, device=self.device)

    def asarray(self, a):
        return self.t.as_tensor(np.asarray(a), device=self.device)

    def cat(self, xs, axis=0):
        return self.t.cat(xs, dim=axis)

    def softmax(self, s):
        return self.t.softmax(s.float(), dim=-1).to(self.dtype)

    def rmsnorm(self, x, g):
        return x * self.t.rsqrt((x.float() * x.float()).mean(-1, keepdim=True) + 1e-6).to(self.dtype) * g

    def silu(self, x):
        return self.t.nn.functional.silu(x)

    def argmax(self, x):
        return x.argmax(-1)

    def tr(self, x):
        return x.transpose(-1, -2)

    def perm(self, x, axes):
        return x.permute(*axes)

    def sync(self):
        if self.device == "cuda":
            self.t.cuda.synchronize()


BACKENDS = {"numpy": _Numpy, "torch": _Torch}


def versions(be) -> dict:
    """Machine and software versions, recorded with every measurement."""
    v = {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
         "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if be.name == "torch":
        v["torch"] = str(be.t.__version__)
        if be.device == "cuda":
            v["gpu"] = str(be.t.cuda.get_device_name())
            v["cuda"] = str(be.t.version.cuda)
    return v


# --- the kernels (servesim calibrate times these same functions) --------------------------------------
def cache_and_attend(be, q, k, v, kc, vc, cached: int, scale: float):
    """Write one sequence's new keys and values k, v [n, K, d] into its cache at `cached` (vLLM's
    reshape_and_cache), then attend; the attention op classes of a calibrated CPU profile time both."""
    n = q.shape[0]
    kc[:, cached:cached + n] = be.perm(k, (1, 0, 2))
    vc[:, cached:cached + n] = be.perm(v, (1, 0, 2))
    return attend(be, q, kc, vc, cached, scale)


def attend(be, q, kc, vc, cached: int, scale: float):
    """Causal attention of one sequence's n new queries q [n, H, d] over its cache kc, vc [K, >= cached+n, d]
    (GQA: H/K query heads per KV head); returns [n, H x d]."""
    n, H, d = q.shape
    K = kc.shape[0]
    L = cached + n
    qs = be.perm(q.reshape(n, K, H // K, d), (1, 2, 0, 3))                    # [K, g, n, d]
    s = (qs @ be.tr(kc[:, None, :L])) * scale                                 # [K, g, n, L]
    if n > 1:
        mask = np.arange(L)[None, :] > (np.arange(n)[:, None] + cached)
        s = s + be.asarray(np.where(mask, -1e30, 0.0).astype(np.float32))
    o = be.softmax(s) @ vc[:, None, :L]                                       # [K, g, n, d]
    return be.perm(o, (2, 0, 1, 3)).reshape(n, H * d)


def rope(be, x, cos, sin):
    """Rotary embedding of x [T, heads, d] at the tokens' positions (cos, sin: [T, d/2])."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return be.cat([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def swiglu(be, gu):
    """SiLU(gate) x up of the fused gate/up projection [T, 2i] -> [T, i]."""
    i = gu.shape[1] // 2
    return be.silu(gu[:, :i]) * gu[:, i:]


class _Seq:
    """One request's KV cache: K and V per layer, [kv_heads, capacity, head_dim]; `length` tokens were
    written by the last forward pass (positions come from the scheduler's cached counts, not from here)."""
    __slots__ = ("k", "v", "length")

    def __init__(self, be, layers: int, kv_heads: int, head_dim: int, capacity: int):
        self.k = [be.zeros(kv_heads, capacity, head_dim) for _ in range(layers)]
        self.v = [be.zeros(kv_heads, capacity, head_dim) for _ in range(layers)]
        self.length = 0


class MeasuredModel:
    needs_ids = True   # the replica passes request ids with each BatchShape and calls release() on frees

    def __init__(self, model: ModelSpec, backend: str = "numpy", device: str = "cpu", seed: int = 0,
                 warmup_steps: int = 3, reference=None):
        if model.attention != "gqa" or model.is_moe:
            raise ConfigError(f"perf_model measured: {model.name} is not a dense GQA/MHA model (MLA and MoE are "
                              "not executed by the measured backend)")
        if backend not in BACKENDS:
            raise ConfigError(f"perf_model.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
        self.be = be = BACKENDS[backend](device, seed)
        self.spec = m = model
        self.layers, self.h, self.d = m.num_layers, m.hidden_size, m.head_dim
        self.H, self.K = m.num_attention_heads, m.num_kv_heads
        h, d, H, K, i = self.h, self.d, self.H, self.K, m.intermediate_size
        s = 1.0 / np.sqrt(h)
        self.embed = be.randn(m.vocab_size, h)
        self.w = [dict(n1=be.randn(h, scale=0.1) + 1.0, qkv=be.randn(h, (H + 2 * K) * d, scale=s),
                       o=be.randn(H * d, h, scale=1.0 / np.sqrt(H * d)), n2=be.randn(h, scale=0.1) + 1.0,
                       gu=be.randn(h, 2 * i, scale=s), down=be.randn(i, h, scale=1.0 / np.sqrt(i)))
                  for _ in range(self.layers)]
        self.norm = be.randn(h, scale=0.1) + 1.0
        self.lm_head = be.randn(h, m.vocab_size, scale=s)
        inv = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))
        ang = np.outer(np.arange(m.max_position_embeddings), inv)
        self.cos, self.sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        self.seqs: dict = {}
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.reference = reference      # optional step-time model priced on the same shapes (validate)
        self.log: list = []             # (prefill tokens, decode seqs, context tokens, measured s, predicted s)

    # --- KV cache bookkeeping (not timed) ---------------------------------------------------------
    def _ensure(self, rid, cached: int, new: int):
        seq = self.seqs.get(rid)
        need = cached + new
        if seq is None:      # a request seen first with cached > 0 starts from prefix-cache hits
            seq = self.seqs[rid] = _Seq(self.be, self.layers, self.K, self.d, max(2 * need, 64))
        elif seq.k[0].shape[1] < need:
            cap = max(2 * seq.k[0].shape[1], need)
            for lst in (seq.k, seq.v):
                for j, a in enumerate(lst):
                    b = self.be.zeros(self.K, cap, self.d)
                    b[:, :a.shape[1]] = a
                    lst[j] = b
        return seq

    def release(self, rid) -> None:
        self.seqs.pop(rid, None)

    # --- the step ---------------------------------------------------------------------------------
    def step_time(self, batch: BatchShape) -> StepTime:
        work = [(self._ensure(r, c, n), c, n) for r, n, c in zip(batch.prefill_ids, batch.prefill_new,
                                                                  batch.prefill_cached)]
        work += [(self._ensure(r, c, 1), c, 1) for r, c in zip(batch.decode_ids, batch.decode_cached)]
        if not work:
            return StepTime(0.0, 0.0, 0.0)
        pos = np.concatenate([np.arange(c, c + n) for _, c, n in work])
        rng = np.random.default_rng(self.steps)
        tokens = self.be.asarray(rng.integers(0, self.spec.vocab_size, len(pos)))
        cos, sin = self.be.asarray(self.cos[pos]), self.be.asarray(self.sin[pos])
        ends = np.cumsum([n for _, _, n in work])
        sample_rows = self.be.asarray((ends - 1)[-batch.num_sampled:] if batch.num_sampled else ends[:0])
        runs = 2 if self.steps < self.warmup_steps else 1
        for _ in range(runs):      # a rerun writes the same K and V rows again: positions come from `work`
            self.be.sync()
            t0 = time.perf_counter()
            self._forward(work, tokens, cos, sin, ends, sample_rows)
            self.be.sync()
            seconds = time.perf_counter() - t0
        self.steps += 1
        if self.reference is not None:
            pred = self.reference.step_time(batch).seconds
            self.log.append((sum(batch.prefill_new), len(batch.decode_cached),
                             sum(batch.prefill_cached) + sum(batch.decode_cached), seconds, pred))
        return StepTime(seconds, 0.0, 0.0)

    def _forward(self, work, tokens, cos, sin, ends, sample_rows):
        be, H, K, d = self.be, self.H, self.K, self.d
        T = int(ends[-1])
        x = self.embed[tokens]
        starts = ends - np.array([n for _, _, n in work])
        scale = float(d) ** -0.5     # a Python float: a numpy float64 scalar would promote float32 to float64
        for li, w in enumerate(self.w):
            qkv = be.rmsnorm(x, w["n1"]) @ w["qkv"]
            q = qkv[:, :H * d].reshape(T, H, d)
            k = qkv[:, H * d:(H + K) * d].reshape(T, K, d)
            v = qkv[:, (H + K) * d:].reshape(T, K, d)
            q, k = rope(be, q, cos, sin), rope(be, k, cos, sin)
            outs = []
            for (seq, c, n), a in zip(work, starts):
                outs.append(cache_and_attend(be, q[a:a + n], k[a:a + n], v[a:a + n], seq.k[li], seq.v[li], c, scale))
            x = x + be.cat(outs) @ w["o"]
            x = x + swiglu(be, be.rmsnorm(x, w["n2"]) @ w["gu"]) @ w["down"]
        for seq, c, n in work:
            seq.length = c + n
        if len(sample_rows):
            logits = be.rmsnorm(x[sample_rows], self.norm) @ self.lm_head
            be.argmax(logits)
        return x

