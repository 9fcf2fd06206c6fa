"""A linear step-time model: exact, hand-checkable timings for tests, teaching and what-ifs.

seconds = base + per_prefill_token * prefill tokens + per_decode_seq * decode sequences
          + per_context_token * cached tokens attended by the batch
"""
from __future__ import annotations

from .step_time import BatchShape, StepTime, decode_steps


class LinearModel:
    def __init__(self, base_s: float = 0.0, per_prefill_token_s: float = 0.0, per_decode_seq_s: float = 0.0,
                 per_context_token_s: float = 0.0):
        self.base_s, self.pt, self.ds, self.ct = base_s, per_prefill_token_s, per_decode_seq_s, per_context_token_s

    def step_time(self, batch: BatchShape) -> StepTime:
        ctx = sum(batch.prefill_cached) + sum(batch.decode_cached) if self.ct else 0
        s = self.base_s + self.pt * sum(batch.prefill_new) + self.ds * len(batch.decode_cached) + self.ct * ctx
        return StepTime(s, 0.0, 0.0)

    def decode_steps(self, ctx, k: int, first=None):
        return decode_steps(self, ctx, k, first)
