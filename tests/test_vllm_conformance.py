"""servesim's `continuous` policy against vLLM's own v1 scheduler, step by step.

The goldens in tests/goldens/vllm_scheduler were recorded from vLLM (experiments/vllm_conformance.py; version in
each file) on scripted request streams: arrivals before given steps, token-id prompts with shared prefixes, KV
pools small enough to preempt, chunked prefill on and off. Here the same streams go through servesim's policy,
block pool and replica bookkeeping (Replica._complete), with no clock: step k is scheduled, then completed. Every
step must agree: which requests run, from which computed-token offset (prefix-cache hits, recomputation after
preemption), with how many tokens; which are preempted, admitted for the first time, finished.
"""
import hashlib
import json
from pathlib import Path

import pytest
import simpy

from servesim.policies.batching import ContinuousBatching
from servesim.policies.eviction import LRU
from servesim.sim.kv_cache import BlockPool
from servesim.sim.metrics import Metrics
from servesim.sim.replica import Replica
from servesim.sim.request import FINISHED, Request

GOLDENS = sorted((Path(__file__).parent / "goldens" / "vllm_scheduler").glob("*.json"))


def block_ids(tokens: list, bs: int) -> list:
    """Chained ids of the prompt's full blocks: equal ids exactly when the prefixes up to them are equal."""
    return [hashlib.sha256(json.dumps(tokens[: (j + 1) * bs]).encode()).hexdigest()[:16]
            for j in range(len(tokens) // bs)]


def replay(golden: dict) -> list[dict]:
    sc = golden["scenario"]
    bs = sc["block_size"]
    env = simpy.Environment()
    sched = ContinuousBatching(sc["max_num_seqs"], sc["max_num_batched_tokens"], sc["enable_chunked_prefill"])
    # vLLM's block pool keeps block 0 as its null block: num_gpu_blocks - 1 hold KV. servesim's pool size is the
    # blocks that hold KV (engine.num_gpu_blocks_override, memory plans): one fewer here
    pool = BlockPool(sc["num_blocks"] - 1, bs, enable_prefix_caching=sc["enable_prefix_caching"], eviction=LRU())
    rep = Replica(env, 0, sched, pool, model=object(), metrics=Metrics(1, 1.0), max_model_len=sc["max_model_len"])
    rep.on_done = lambda req, now: None
    preempted: list = []
    plain_preempt = rep.preempt
    rep.preempt = lambda r: (preempted.append(str(r.id)), plain_preempt(r))
    pending = sorted(sc["requests"], key=lambda r: r["arrive_step"])
    done = 0
    steps = []
    for k in range(len(golden["steps"])):
        while pending and pending[0]["arrive_step"] <= k:
            r = pending.pop(0)
            rep.add(Request(int(r["id"]), float(k), len(r["prompt"]), r["max_tokens"],
                            prefix_ids=block_ids(r["prompt"], bs), prefix_block_size=bs))
        preempted.clear()
        batch = sched.schedule(rep, float(k))
        new = [str(r.id) for r, _ in batch if r.first_scheduled != r.first_scheduled]
        for r, _ in batch:
            if r.first_scheduled != r.first_scheduled:
                r.first_scheduled = float(k)
        start = {str(r.id): r.num_computed for r, _ in batch}
        rep._complete(batch, float(k) + 1.0)
        fin = sorted(str(r.id) for r, _ in batch if r.outcome == FINISHED)
        done += len(fin)
        steps.append({"step": k, "scheduled": {str(r.id): n for r, n in batch}, "preempted": sorted(preempted),
                      "new": new, "start": start, "finished": fin})
    assert done == len(sc["requests"])
    return steps


@pytest.mark.parametrize("path", GOLDENS, ids=lambda p: p.stem)
def test_every_step_matches_vllm(path):
    golden = json.loads(path.read_text())
    assert golden["vllm_version"]
    ours = replay(golden)
    for theirs, mine in zip(golden["steps"], ours):
        for key in ("scheduled", "start", "preempted", "new", "finished"):
            t, m = theirs[key], mine[key]
            if key in ("new",):
                t, m = sorted(t), sorted(m)
            assert m == t, f"{path.stem} step {theirs['step']}: {key} differs\n  vLLM:     {t}\n  servesim: {m}"


def test_there_are_goldens_with_preemption_and_prefix_hits():
    goldens = [json.loads(p.read_text()) for p in GOLDENS]
    assert len(goldens) >= 5
    assert sum(len(s["preempted"]) for g in goldens for s in g["steps"]) >= 10
    hits = [s for g in goldens if g["scenario"]["enable_prefix_caching"] for s in g["steps"]
            for rid in s["new"] if s["start"][rid] > 0]
    assert hits, "no golden step admits a request with prefix-cache hits"
    assert any(not g["scenario"]["enable_chunked_prefill"] for g in goldens)
