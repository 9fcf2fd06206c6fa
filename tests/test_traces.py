"""Trace loaders on the bundled samples, synthetic generators, closed-loop clients."""
import re

import numpy as np
import pytest

from conftest import run_raw
from servesim.sim.config import parse_config
from servesim.sim.errors import TraceError
from servesim.traces.loaders import load_trace, resolve_path
from servesim.traces.synthetic import arrival_times
from servesim.traces.workload import build_workload, cap_total_tokens


def test_bundled_azure_conv_matches_its_published_statistics():
    tr = load_trace(resolve_path("bundled:azure_conv_2023.csv.gz"))
    assert len(tr) == 19366                                  # rows, as in the upstream file
    assert tr.arrival[0] == 0.0 and tr.arrival[-1] == pytest.approx(3501.7, abs=0.1)
    assert tr.prompt.max() == 14050 and tr.output.max() == 1000
    assert tr.prompt.mean() == pytest.approx(1155, abs=1)


def test_bundled_mooncake_keeps_block_ids():
    tr = load_trace(resolve_path("bundled:mooncake_conversation_head3000.jsonl.gz"))
    assert len(tr) == 3000 and tr.prefix_block_size == 512
    assert all(len(h) == -(-p // 512) for h, p in zip(tr.prefix_ids, tr.prompt))
    assert tr.prefix_ids[0][0] == 0


def test_lengths_only_trace_needs_an_arrival_process():
    cfg = parse_config({"fleet": {"replicas": [{"gpu": "H100", "model": "llama3.1-8b"}]},
                        "workload": {"kind": "trace", "path": "bundled:sharegpt_lengths_head5000.csv.gz"}})
    with pytest.raises(TraceError, match="no arrival times; use workload kind 'synthetic'"):
        build_workload(cfg.workload, np.random.default_rng(0))


@pytest.mark.parametrize("rows, message", [
    ("1,100,5\n2,0,5\n", "t.csv:3: column prompt_tokens is '0'; expected an integer >= 1"),          # int, too small
    ("1,100,5\n2,7.5,5\n", "t.csv:3: column prompt_tokens is '7.5'; expected an integer >= 1"),      # read as float
    ("1,100,5\n2,100,\n", "t.csv:3: column output_tokens is ''; expected an integer >= 1"),          # empty cell
    ("1,100,5\n-2,100,5\n", "t.csv:3: arrival_s '-2' is not a number >= 0"),
])
def test_a_bad_csv_cell_is_quoted_as_written(tmp_path, rows, message):
    """Cells pandas reads as integers are taken at once; any other cell is checked on its text, so the error
    quotes it as the file has it."""
    (tmp_path / "t.csv").write_text("arrival_s,prompt_tokens,output_tokens\n" + rows)
    with pytest.raises(TraceError, match=re.escape(message)):
        load_trace(tmp_path / "t.csv")
    (tmp_path / "t.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0.5,100,5\n1.25,7,1\n")
    tr = load_trace(tmp_path / "t.csv")
    assert tr.prompt.dtype == np.int64 and tr.prompt.tolist() == [100, 7] and tr.output.tolist() == [5, 1]
    assert tr.arrival.tolist() == [0.0, 0.75]


def test_cap_total_tokens_shortens_prompts_like_vidur():
    p, o = cap_total_tokens(np.array([100, 5000, 10]), np.array([50, 100, 5000]), 4096)
    assert p.tolist() == [100, 3996, 1] and o.tolist() == [50, 100, 4095]


def test_trace_transforms_rate_scale_window_and_sampling():
    base = {"fleet": {"replicas": [{"gpu": "H100", "model": "llama3.1-8b"}]},
            "workload": {"kind": "trace", "path": "bundled:azure_conv_2023.csv.gz", "start_s": 600,
                         "duration_s": 600, "rate_scale": 2.0}}
    w = build_workload(parse_config(base).workload, np.random.default_rng(0))
    full = load_trace(resolve_path("bundled:azure_conv_2023.csv.gz"))
    sel = (full.arrival >= 600) & (full.arrival < 1200)
    assert len(w) == sel.sum()
    assert np.allclose(w.arrival, (full.arrival[sel] - 600) / 2)
    base["workload"]["sample_fraction"] = 0.25
    w2 = build_workload(parse_config(base).workload, np.random.default_rng(0))
    assert abs(len(w2) / sel.sum() - 0.25) < 0.03


@pytest.mark.parametrize("process,cv", [("poisson", 1.0), ("gamma", 3.0), ("gamma", 0.5), ("constant", 0.0)])
def test_arrival_processes_have_the_asked_rate_and_burstiness(process, cv):
    spec = {"poisson": {"process": "poisson", "rate": 4.0}, "gamma": {"process": "gamma", "rate": 4.0, "cv": cv},
            "constant": {"process": "constant", "rate": 4.0}}[process]
    cfg = parse_config({"fleet": {"replicas": [{"gpu": "H100", "model": "llama3.1-8b"}]},
                        "workload": {"kind": "synthetic", "num_requests": 200_000, "arrival": spec,
                                     "lengths": {"kind": "independent", "input": {"dist": "fixed", "value": 1},
                                                 "output": {"dist": "fixed", "value": 1}}}})
    t = arrival_times(cfg.workload.arrival, 200_000, None, np.random.default_rng(1))
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(0.25, rel=0.01)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, abs=0.03)


def test_closed_loop_keeps_exactly_n_requests_in_flight(base_raw):
    raw = base_raw
    raw["workload"] = {"kind": "synthetic", "num_requests": 400,
                       "arrival": {"process": "closed_loop", "concurrency": 8, "think_time_s": 0.0},
                       "lengths": {"kind": "independent", "input": {"dist": "uniform", "low": 10, "high": 300},
                                   "output": {"dist": "uniform", "low": 1, "high": 50}}}
    res, df = run_raw(raw)
    assert len(df) == 400 and (df["outcome"] == "finished").all()
    # with zero think time a client's next request arrives exactly when its previous one finishes
    ev = sorted([(a, 1) for a in df["arrival_s"]] + [(f, -1) for f in df["finish_s"]], key=lambda x: (x[0], x[1]))
    n, peak = 0, 0
    for _, d in ev:
        n += d
        peak = max(peak, n)
    assert peak == 8
    assert (df["arrival_s"].to_numpy()[:8] == 0).all()
    finishes = set(np.round(df["finish_s"], 12))
    assert all(round(a, 12) in finishes for a in df["arrival_s"].to_numpy()[8:])


def test_kv_cache_tester_conversations_load_with_sessions_and_scoped_block_ids():
    import gzip
    import json

    from servesim.traces.loaders import DATA_DIR, load_trace, resolve_path
    folder = resolve_path("bundled:kv_cache_tester_sample")
    tr = load_trace(folder, conversation_interval_s=30.0)
    files = sorted(folder.iterdir())
    assert len(files) == 20 and set(tr.sessions.tolist()) == set(range(20))

    def count(reqs):
        return sum(count(r["requests"]) if r["type"] == "subagent" else 1 for r in reqs)
    docs = [json.load(gzip.open(f)) for f in files]
    for c, doc in enumerate(docs):
        mine = tr.sessions == c
        assert mine.sum() == count(doc["requests"])
        first = doc["requests"][0]
        # conversation c starts at c x 30 s (the trace's clock starts at its first request)
        assert tr.arrival[mine].min() == pytest.approx(c * 30.0 + first["t"] - tr_start(docs))
        ids = {h for i in np.flatnonzero(mine) for h in tr.prefix_ids[i]}
        assert all(h >> 32 == c for h in ids)                     # ids scoped to their conversation
    assert np.all(np.diff(tr.arrival) >= 0) and tr.prefix_block_size == 64
    assert DATA_DIR in folder.parents


def tr_start(docs):
    return min(c * 30.0 + d["requests"][0]["t"] for c, d in enumerate(docs))


def test_a_broken_conversation_file_is_named(tmp_path):
    import gzip
    import json

    from servesim.traces.loaders import load_trace
    (tmp_path / "trace_0001.json").write_text(json.dumps(
        {"block_size": 64, "requests": [{"t": 0, "type": "n", "in": 130, "out": 5, "hash_ids": [1]}]}))
    with pytest.raises(TraceError, match=r"trace_0001.json: requests\[0\]: expected in >= 1, out >= 1 and in // 64"):
        load_trace(tmp_path)
    with gzip.open(tmp_path / "trace_0001.json", "wt") as f:
        f.write("{")
    with pytest.raises(TraceError, match="not a kv-cache-tester conversation"):
        load_trace(tmp_path)


def test_session_affinity_keeps_agentic_conversations_on_their_cache():
    import copy

    from conftest import BASE, run_raw

    def hit_rate(routing):
        raw = copy.deepcopy(BASE)
        raw["sim"] = {}
        raw["fleet"]["replicas"][0].update(count=4, engine={"enable_prefix_caching": True})
        raw["policies"] = {"routing": {"name": routing}}
        raw["workload"] = {"kind": "trace", "path": "bundled:kv_cache_tester_sample", "max_requests": 300,
                           "conversation_interval_s": 20}
        _, df = run_raw(raw)
        assert (df["reason"] == "exceeds_max_model_len").sum() > 0          # prompts beyond 128k are refused
        return df["cached_prompt_tokens"].sum() / df["prompt_tokens"].sum()
    assert hit_rate("session_affinity") > hit_rate("round_robin") + 0.1
