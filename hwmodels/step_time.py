"""The step-time seam: what one engine iteration costs for a batch of given shapes.

A batch is described by shapes only. Each scheduled sequence processes `new` tokens on top of
`cached` tokens already in its KV cache; decodes are the sequences with exactly one new token
that continue an already-started output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol


@dataclass(slots=True)
class BatchShape:
    prefill_new: list[int] = field(default_factory=list)      # chunk length per prefilling sequence
    prefill_cached: list[int] = field(default_factory=list)   # tokens already cached before the chunk
    decode_cached: list[int] = field(default_factory=list)    # tokens cached before each decode token
    num_sampled: int = 0  # sequences that produce a token this step (LM head + sampling rows)
    # request ids of the sequences above, filled only for models that keep per-request state
    # (`needs_ids = True`, the measured backend); shape-only models never look at them
    prefill_ids: list = field(default_factory=list)
    decode_ids: list = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.prefill_new) + len(self.decode_cached)

    @property
    def is_empty(self) -> bool:
        return not self.prefill_new and not self.decode_cached


class StepTime(NamedTuple):
    seconds: float
    flops: float       # useful model FLOPs of the step (for MFU)
    bytes: float       # bytes moved to/from device memory (for MBU)
    # where the seconds went (attribution, `servesim explain`): ops whose compute term bounds them, ops whose
    # memory term does, collectives, per-step CPU overhead. A model that cannot split its time (linear,
    # measured) leaves them 0 and the step counts as unattributed ("other")
    compute_s: float = 0.0
    memory_s: float = 0.0
    collective_s: float = 0.0
    overhead_s: float = 0.0


PARTS = ("compute_s", "memory_s", "collective_s", "overhead_s")


class StepTimeModel(Protocol):
    def step_time(self, batch: BatchShape) -> StepTime: ...


class DecodeSteps:
    """k consecutive pure-decode steps of one batch (a decode run's pricing): `secs`, each step's seconds (an
    array: the run sums step ends from it), and the FLOPs, bytes and StepTime split (PARTS) of each step, which
    the run needs per step only when tracing (`arrays`) and otherwise summed over its first n steps (`sums`)."""
    __slots__ = ("secs", "flops", "nbytes", "parts")

    def __init__(self, secs, flops, nbytes, parts):
        self.secs, self.flops, self.nbytes, self.parts = secs, flops, nbytes, parts   # parts: 4 x k

    def arrays(self, n: int):
        """(seconds, FLOPs, bytes, parts 4 x n) of the first n steps."""
        return self.secs[:n], self.flops[:n], self.nbytes[:n], self.parts[:, :n]

    def sums(self, n: int) -> tuple[float, float, list[float]]:
        """FLOPs, bytes and the four parts summed over the first n steps."""
        return float(self.flops[:n].sum()), float(self.nbytes[:n].sum()), self.parts[:, :n].sum(axis=1).tolist()


def decode_steps(model, ctx, k: int, first: StepTime | None = None) -> DecodeSteps:
    """k consecutive pure-decode steps of one batch: step j decodes one token for every sequence, on ctx + j
    cached tokens (ctx: a list of ints; first, when given, is step 0's StepTime, already computed). Each step
    priced by model.step_time, so a run of steps costs exactly what k separate steps would."""
    import numpy as np
    out = np.empty((7, k))
    n = len(ctx)
    for j in range(k):
        st = first if j == 0 and first is not None else \
            model.step_time(BatchShape(decode_cached=[int(c) + j for c in ctx], num_sampled=n))
        out[:, j] = st
    return DecodeSteps(out[0], out[1], out[2], out[3:])
