"""Speculative decoding: a draft proposes k tokens, the target verifies them in one (k+1)-token pass.

With a per-token acceptance rate alpha (independent draws, as in Leviathan et al., "Fast Inference
from Transformers via Speculative Decoding", ICML 2023), the tokens produced by one verification
step - accepted draft tokens plus the target's own next token - have expectation
    E[tokens] = (1 - alpha^(k+1)) / (1 - alpha)      (= k + 1 when alpha = 1).
"""
from __future__ import annotations

from .roofline import RooflineModel
from .step_time import BatchShape


def expected_tokens(alpha: float, k: int) -> float:
    if not 0.0 <= alpha <= 1.0 or k < 0:
        raise ValueError(f"need 0 <= alpha <= 1 and k >= 0, got alpha={alpha}, k={k}")
    return float(k + 1) if alpha == 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)


def step_cost(target: RooflineModel, draft: RooflineModel | None, contexts: list[int], k: int) -> float:
    """Seconds of one speculative step for a decode batch: k sequential draft decodes (each sequence's
    context grows by one per draft token) plus one target pass verifying k+1 tokens per sequence."""
    t = 0.0
    n = len(contexts)
    if draft is not None:
        for j in range(k):
            t += draft.step_time(BatchShape([], [], [c + j for c in contexts], n)).seconds
    verify = BatchShape([k + 1] * n, list(contexts), [], n)
    return t + target.step_time(verify).seconds


def speedup(target: RooflineModel, draft: RooflineModel | None, contexts: list[int], k: int, alpha: float) -> float:
    """Tokens per second with speculation over tokens per second of plain decoding."""
    plain = target.step_time(BatchShape([], [], list(contexts), len(contexts))).seconds
    return expected_tokens(alpha, k) * plain / step_cost(target, draft, contexts, k)
