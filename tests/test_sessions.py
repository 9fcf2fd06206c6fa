"""Agentic sessions: turn order and think times, sub-agents, shared prefixes, KV retention between turns."""
import copy
import json

import pytest

from conftest import BASE, run_raw
from servesim.sim.config import parse_config
from servesim.sim.errors import ConfigError
from servesim.sim.report import build_report, session_table


def _turn(n_in, out, ids, think=0.0):
    assert len(ids) == n_in // 64
    return {"t": 0, "type": "s", "in": n_in, "out": out, "hash_ids": ids, "think_time": think}


def _write(folder, convs):
    folder.mkdir(exist_ok=True)
    for i, reqs in enumerate(convs):
        (folder / f"trace_{i:04d}.json").write_text(json.dumps({"id": f"c{i}", "block_size": 64, "requests": reqs}))
    return str(folder)


def _raw(path, rate=1.0, retention="evict", blocks=None):
    raw = copy.deepcopy(BASE)
    g = raw["fleet"]["replicas"][0]
    g["perf_model"] = {"name": "linear", "base_s": 1.0}
    g["engine"] = {"enable_prefix_caching": True, **({"num_gpu_blocks_override": blocks} if blocks else {})}
    raw["workload"] = {"kind": "sessions", "path": path, "arrival": {"process": "constant", "rate": rate},
                       "retention": retention}
    return raw


def test_turn_order_think_times_and_sub_agents(tmp_path):
    # A; 5 s of thought; B; two sub-agents together (2 turns each, 1 s apart); 2 s; C. Every response is a
    # 1 s prefill step plus 1 s per further token.
    sub = lambda base: [_turn(64, 2, [base]), _turn(128, 2, [base, base + 1], think=1.0)]  # noqa: E731
    conv = [_turn(128, 3, [1, 2]), _turn(192, 2, [1, 2, 3], think=5.0),
            {"type": "subagent", "t": 0, "agent_id": "x", "requests": sub(10)},
            {"type": "subagent", "t": 0, "agent_id": "y", "requests": sub(20)},
            _turn(256, 1, [1, 2, 3, 4], think=2.0)]
    res, df = run_raw(_raw(_write(tmp_path / "c", [conv])))
    df = df.sort_values("id").reset_index(drop=True)
    a, b = df.iloc[0], df.iloc[1]
    assert (a["arrival_s"], a["finish_s"]) == (0.0, 3.0)
    assert b["arrival_s"] == a["finish_s"] + 5.0
    subs = df.iloc[2:6]
    firsts = subs[subs["prompt_tokens"] == 64]
    assert (firsts["arrival_s"] == b["finish_s"]).all()       # both sub-agents start when the parent gets there
    for _, s in subs[subs["prompt_tokens"] == 128].iterrows():
        mine = firsts[firsts["id"] < s["id"]]
        assert s["arrival_s"] in set(mine["finish_s"] + 1.0)   # each sub-agent's 2nd turn 1 s after its 1st
    c = df.iloc[6]
    assert c["arrival_s"] == subs["finish_s"].max() + 2.0    # the parent waits for both sub-agents
    # B extends A's prompt: A's two 64-token blocks come from the prefix cache
    assert b["cached_prompt_tokens"] == 128 and c["cached_prompt_tokens"] == 192
    st = session_table(res)
    assert st["end_s"][0] == c["finish_s"] and st["think_s"][0] == 5 + 1 + 1 + 2
    assert st["requests"][0] == 7 and st["waiting_on_server_s"][0] == st["duration_s"][0] - 9
    rep = build_report(res, df)
    assert rep["sessions"]["sessions"] == rep["sessions"]["completed"] == 1


def _pressure(tmp_path, retention):
    # a 120-block pool (16 tokens each). Session 1: 640 tokens, 20 s of thought, then the same 640 + 64 more.
    # Session 2 (from t=1) sends three unrelated 1,000-token prompts whose blocks, cached after each turn,
    # push session 1's cached prefix out of an LRU pool, unless session 1 keeps it.
    s1 = [_turn(640, 2, list(range(1, 11))), _turn(704, 2, list(range(1, 12)), think=20.0)]
    s2 = [_turn(1000, 2, list(range(100 * k, 100 * k + 15)), think=1.0) for k in (1, 2, 3)]
    res, df = run_raw(_raw(_write(tmp_path / retention, [s1, s2]), rate=1.0, retention=retention, blocks=120))
    second = df[(df["prompt_tokens"] == 704)].iloc[0]
    return res, second


def test_keep_retention_holds_the_prefix_that_eviction_loses(tmp_path):
    _, evicted = _pressure(tmp_path, "evict")
    res, kept = _pressure(tmp_path, "keep")
    assert evicted["cached_prompt_tokens"] < 640
    assert kept["cached_prompt_tokens"] == 640
    assert res.pools[0].pins == {} and res.pools[0].num_used == 0     # every pin released at the end


def test_pins_give_way_when_nothing_else_can_run(tmp_path):
    # 60 blocks: session 1's 40 kept blocks leave too few for session 2's 1,000-token prompt (63 blocks); with
    # nothing running, the pin is released rather than deadlocking
    s1 = [_turn(640, 2, list(range(1, 11))), _turn(704, 2, list(range(1, 12)), think=20.0)]
    s2 = [_turn(900, 2, list(range(100, 114)))]
    res, df = run_raw(_raw(_write(tmp_path / "x", [s1, s2]), retention="keep", blocks=60))
    assert (df["outcome"] == "finished").all()


def test_bundled_sessions_run_and_report(tmp_path):
    raw = _raw("bundled:kv_cache_tester_sample", rate=0.2)
    raw["fleet"]["replicas"][0]["perf_model"] = {"name": "roofline"}
    raw["fleet"]["replicas"][0]["engine"]["max_model_len"] = 131072
    raw["workload"]["num_sessions"] = 3
    raw["sim"]["check_invariants"] = False
    res, df = run_raw(raw)
    rep = build_report(res, df)
    s = rep["sessions"]
    assert s["sessions"] == 3 and s["completed"] == 3
    assert s["requests_per_session"] == len(df) / 3
    assert 0 < s["prefix_cache_hit_rate"] < 1 and 0 < s["waiting_share"] < 1


def test_bad_session_configs(tmp_path):
    raw = _raw("bundled:kv_cache_tester_sample", retention="offload")
    with pytest.raises(ConfigError, match="kv_offload has no tiers"):
        parse_config(raw)
    raw = _raw("bundled:kv_cache_tester_sample", retention="keep")
    raw["fleet"]["replicas"][0]["engine"]["enable_prefix_caching"] = False
    with pytest.raises(ConfigError, match="enable_prefix_caching must be true"):
        parse_config(raw)
    raw = _raw("bundled:kv_cache_tester_sample")
    raw["workload"]["arrival"] = {"process": "closed_loop", "concurrency": 2}
    with pytest.raises(ConfigError, match="open-loop process"):
        parse_config(raw)
