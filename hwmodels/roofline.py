"""First roofline step-time model: per-op FLOPs and bytes, time = max(compute, memory) + floor.

Each op is priced as max(flops / (peak x compute_efficiency), bytes / (bandwidth x memory_efficiency))
plus the GPU's kernel floor; the efficiencies come from the GPU catalog (measured large-kernel
throughput). TP adds two ring all-reduces per layer (alpha-beta). Pipeline stages run one after
another for a batch (no micro-batch overlap yet). The calibrated, shape-dependent model is issue 4.
"""
from __future__ import annotations

import math

from .catalog import GPU, ModelSpec
from .memory import dtype_bytes, engine_constants, kv_bytes_per_token
from .ops import attention, gemm, ring_all_reduce_time, send_recv_time
from .step_time import BatchShape, StepTime


class RooflineModel:
    def __init__(self, model: ModelSpec, gpu: GPU, *, tp: int = 1, pp: int = 1, dtype: str = "bf16",
                 kv_dtype: str = "bf16", overhead_s: float = 0.0):
        self.model, self.gpu, self.tp, self.pp = model, gpu, tp, pp
        self.overhead_s = overhead_s
        self.wb = dtype_bytes(dtype)
        self.ab = 2  # activations stay 16-bit in every supported profile
        m = model
        h, d = m.hidden_size, m.head_dim
        self.flops_peak = gpu.peak_flops(dtype) * gpu.compute_efficiency
        self.bw = gpu.mem_bw * gpu.memory_efficiency
        self.floor = gpu.kernel_floor_s
        self.layers_per_gpu = math.ceil(m.num_layers / pp)
        self.heads = m.num_attention_heads / tp
        self.kv_layer_bytes = kv_bytes_per_token(m, tp, 1, kv_dtype) / m.num_layers  # per token per layer
        self.w_qkv = h * (m.num_attention_heads + 2 * m.num_kv_heads) * d / tp
        self.w_o = m.num_attention_heads * d * h / tp
        self.w_expert = 3 * h * m.intermediate_size / tp  # gate+up+down of one expert (or the dense MLP)
        self.w_lm = m.vocab_size * h / tp
        self.link_bw = gpu.link_bw or 0.0
        self.alpha = engine_constants()["collective_latency_s"]

    def _op(self, flops: float, nbytes: float) -> float:
        return max(flops / self.flops_peak, nbytes / self.bw) + self.floor

    def _gemm(self, tokens: float, weights: float, n_in: float, n_out: float) -> tuple[float, float, float]:
        f, b = gemm(tokens, n_out, n_in, self.wb, self.ab, self.ab)
        return self._op(f, b), f, b

    def breakdown(self, batch: BatchShape) -> dict[str, tuple[float, float, float]]:
        """Per-op (seconds, flops, bytes) for the whole step, all layers and stages included."""
        m, L = self.model, self.layers_per_gpu * self.pp
        h = m.hidden_size
        T = sum(batch.prefill_new) + len(batch.decode_cached)
        ops: dict[str, tuple[float, float, float]] = {}
        if T == 0:
            return ops

        def put(name, t, f, b, times=L):
            ops[name] = (t * times, f * times, b * times)

        put("qkv_proj", *self._gemm(T, self.w_qkv, h, self.w_qkv / h))
        put("o_proj", *self._gemm(T, self.w_o, self.w_o / h, h))
        # attention: causal FlashAttention over (cached + new) keys; decode reads the whole KV
        kvh = self.kv_layer_bytes / (2 * m.head_dim)  # kv heads x kv dtype bytes, per GPU
        if batch.prefill_new:
            pf = pb = 0.0
            for c, ctx in zip(batch.prefill_new, batch.prefill_cached):
                f, b = attention(c, ctx, self.heads, kvh, m.head_dim, 1, self.ab)
                pf, pb = pf + f, pb + b
            put("attn_prefill", self._op(pf, pb), pf, pb)
        if batch.decode_cached:
            df = db = 0.0
            for ctx in batch.decode_cached:
                f, b = attention(1, ctx, self.heads, kvh, m.head_dim, 1, self.ab)
                df, db = df + f, db + b
            put("attn_decode", self._op(df, db), df, db)
        if m.is_moe:
            E, k = m.num_experts, m.experts_per_token
            touched = E * (1 - (1 - k / E) ** T) + m.shared_experts
            flops = 2 * T * (k + m.shared_experts) * self.w_expert
            nbytes = touched * self.w_expert * self.wb + T * (2 * h + 3 * k * m.intermediate_size / self.tp) * self.ab
            put("moe_experts", self._op(flops, nbytes), flops, nbytes)
        else:
            i_tp = m.intermediate_size / self.tp
            put("mlp_up", *self._gemm(T, 2 * h * i_tp, h, 2 * i_tp))
            put("mlp_down", *self._gemm(T, i_tp * h, i_tp, h))
        # norms, rope, activation, residual adds: memory-bound elementwise passes over the activations
        eb = T * self.ab * (10 * h + 3 * m.intermediate_size * max(1, m.experts_per_token) / self.tp)
        put("elementwise", self._op(0.0, eb), 0.0, eb)
        if self.tp > 1:
            put("all_reduce", ring_all_reduce_time(T * h * self.ab, self.tp, self.link_bw, self.alpha), 0.0, 0.0,
                times=2 * L)
        if self.pp > 1:
            ops["send_recv"] = ((self.pp - 1) * send_recv_time(T * h * self.ab, self.link_bw, self.alpha), 0.0, 0.0)
        S = max(batch.num_sampled, 0)
        ops["embed"] = (self._op(0.0, T * h * self.ab), 0.0, T * h * self.ab)
        if S:
            lf, lb = 2 * S * self.w_lm, self.w_lm * self.wb + S * (h * self.ab + m.vocab_size / self.tp * 4)
            ops["lm_head"] = (self._op(lf, lb), lf, lb)
        if self.overhead_s:
            ops["cpu_overhead"] = (self.overhead_s, 0.0, 0.0)
        return ops

    def step_time(self, batch: BatchShape) -> StepTime:
        """Same arithmetic as breakdown() (a test holds them equal), without building the dict:
        this runs once per simulated iteration."""
        T = sum(batch.prefill_new) + len(batch.decode_cached)
        if T == 0:
            return StepTime(self.overhead_s, 0.0, 0.0)
        c = self._consts
        F, B, fl = self.flops_peak, self.bw, self.floor
        L = c["L"]
        t = 0.0
        flops = 0.0
        nbytes = 0.0
        for w, n_io in c["gemms"]:        # (weights, activations in+out per token)
            f = 2 * T * w
            b = w * self.wb + T * n_io * self.ab
            t += (f / F if f / F > b / B else b / B) + fl
            flops += f
            nbytes += b
        t *= L
        flops *= L
        nbytes *= L
        hd, kvb, ab = c["hd"], self.kv_layer_bytes, self.ab
        if batch.prefill_new:
            pf = pb = 0.0
            for n, ctx in zip(batch.prefill_new, batch.prefill_cached):
                pf += 4 * hd * n * (ctx + (n + 1) / 2)
                pb += (ctx + n) * kvb + 2 * n * hd * ab
            t += L * (max(pf / F, pb / B) + fl)
            flops += L * pf
            nbytes += L * pb
        if batch.decode_cached:
            nd = len(batch.decode_cached)
            ctx_sum = sum(batch.decode_cached) + nd
            df, db = 4 * hd * ctx_sum, ctx_sum * kvb + 2 * nd * hd * ab
            t += L * (max(df / F, db / B) + fl)
            flops += L * df
            nbytes += L * db
        m = self.model
        if m.is_moe:
            E, k = m.num_experts, m.experts_per_token
            touched = E * (1 - (1 - k / E) ** T) + m.shared_experts
            f = 2 * T * (k + m.shared_experts) * self.w_expert
            b = touched * self.w_expert * self.wb + T * (2 * m.hidden_size + 3 * k * m.intermediate_size / self.tp) * ab
            t += L * (max(f / F, b / B) + fl)
            flops += L * f
            nbytes += L * b
        eb = T * c["elem"]
        t += L * (eb / B + fl)
        nbytes += L * eb
        if self.tp > 1:
            t += 2 * L * (2 * (self.tp - 1) * self.alpha + 2 * (self.tp - 1) / self.tp * T * c["hab"] / self.link_bw)
        if self.pp > 1:
            t += (self.pp - 1) * (self.alpha + T * c["hab"] / self.link_bw)
        t += T * c["hab"] / B + fl
        nbytes += T * c["hab"]
        S = batch.num_sampled
        if S:
            lf = 2 * S * self.w_lm
            lb = self.w_lm * self.wb + S * (c["hab"] + m.vocab_size / self.tp * 4)
            t += max(lf / F, lb / B) + fl
            flops += lf
            nbytes += lb
        g = self.tp  # ops are per GPU; the replica's FLOPs and bytes are tp x those (MFU over all GPUs)
        return StepTime(t + self.overhead_s, g * flops, g * nbytes)

    @property
    def _consts(self):
        c = self.__dict__.get("_c")
        if c is None:
            m, h = self.model, self.model.hidden_size
            gemms = [(self.w_qkv, h + self.w_qkv / h), (self.w_o, self.w_o / h + h)]
            if not m.is_moe:
                i_tp = m.intermediate_size / self.tp
                gemms += [(2 * h * i_tp, h + 2 * i_tp), (i_tp * h, i_tp + h)]
            c = self.__dict__["_c"] = {
                "L": self.layers_per_gpu * self.pp, "gemms": gemms, "hd": self.heads * m.head_dim,
                "elem": self.ab * (10 * h + 3 * m.intermediate_size * max(1, m.experts_per_token) / self.tp),
                "hab": h * self.ab}
        return c
