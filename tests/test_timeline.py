"""Exact timelines: hand-computed step times give exactly these TTFT and E2E values."""
import pytest

from conftest import BASE, run_raw
import copy

LINEAR = {"name": "linear", "base_s": 0.010, "per_prefill_token_s": 0.001, "per_decode_seq_s": 0.002}


def _raw(tmp_path, rows, **engine):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{a},{p},{o}\n" for a, p, o in rows))
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"][0]["perf_model"] = LINEAR
    raw["fleet"]["replicas"][0]["engine"] = {"enable_prefix_caching": False, **engine}
    raw["workload"] = {"kind": "trace", "path": str(trace)}
    return raw


def test_three_requests_exact_timeline(tmp_path):
    # step 1 @0:     r0 prefill 100            -> 0.010 + 0.100         = 0.110  (r0 token 1)
    # step 2 @0.110: r0 decode + r1 prefill 50 -> 0.010 + 0.050 + 0.002 = 0.062  (r0 tok 2, r1 tok 1)
    # step 3 @0.172: r0 decode + r1 decode     -> 0.010 + 0.004         = 0.014  (both finish @0.186)
    # idle; step 4 @0.5: r2 prefill 10         -> 0.010 + 0.010         = 0.020  (r2 finishes @0.520)
    _, df = run_raw(_raw(tmp_path, [(0.0, 100, 3), (0.05, 50, 2), (0.5, 10, 1)]))
    assert list(df["outcome"]) == ["finished"] * 3
    assert df["ttft_s"].tolist() == pytest.approx([0.110, 0.172 - 0.05, 0.020], abs=1e-12)
    assert df["e2e_s"].tolist() == pytest.approx([0.186, 0.186 - 0.05, 0.020], abs=1e-12)
    assert df["first_scheduled_s"].tolist() == pytest.approx([0.0, 0.110, 0.5], abs=1e-12)
    assert df["tpot_s"].tolist()[:2] == pytest.approx([(0.186 - 0.110) / 2, (0.186 - 0.172) / 1], abs=1e-12)
    assert df["generated_tokens"].tolist() == [3, 2, 1]


def test_chunked_prefill_splits_the_prompt_by_the_token_budget(tmp_path):
    # budget 64: step 1 computes 64 tokens (0.074 s, no token), step 2 the other 36 (0.046 s) -> first token
    _, df = run_raw(_raw(tmp_path, [(0.0, 100, 2)], max_num_batched_tokens=64))
    assert df["ttft_s"][0] == pytest.approx(0.074 + 0.046, abs=1e-12)
    assert df["e2e_s"][0] == pytest.approx(0.120 + 0.012, abs=1e-12)


def test_without_chunked_prefill_a_prompt_waits_for_budget(tmp_path):
    # budget 128, chunking off: r1's 100-token prompt does not fit beside r0's 100 in one step,
    # so it runs in the next step (with r0's decode) instead of being split.
    _, df = run_raw(_raw(tmp_path, [(0.0, 100, 2), (0.0, 100, 1)], max_num_batched_tokens=128,
                         enable_chunked_prefill=False))
    # step 1: r0 prefill 100 (0.110); step 2: r0 decode + r1 prefill 100 (0.010+0.100+0.002 = 0.112)
    assert df["first_token_s"].tolist() == pytest.approx([0.110, 0.222], abs=1e-12)
    assert df["finish_s"].tolist() == pytest.approx([0.222, 0.222], abs=1e-12)


def test_same_instant_arrival_joins_the_batch_starting_then(tmp_path):
    # r1 arrives exactly when r0's prefill step ends (0.110): it must be in the next batch.
    _, df = run_raw(_raw(tmp_path, [(0.0, 100, 2), (0.110, 10, 1)]))
    assert df["first_scheduled_s"][1] == pytest.approx(0.110, abs=1e-12)
    assert df["finish_s"][1] == pytest.approx(0.110 + 0.010 + 0.010 + 0.002, abs=1e-12)


def test_static_batching_admits_only_when_the_batch_has_drained(tmp_path):
    raw = _raw(tmp_path, [(0.0, 100, 3), (0.05, 50, 1)])
    raw["policies"] = {"batching": {"name": "static"}}
    _, df = run_raw(raw)
    # r0 alone: 0.110 + 0.012 + 0.012 = 0.134; only then r1: prefill 50 -> 0.134 + 0.060
    assert df["finish_s"].tolist() == pytest.approx([0.134, 0.194], abs=1e-12)


def test_completion_before_arrival_before_scheduling_at_one_instant(tmp_path):
    # Every step takes exactly 0.25 s. Two replicas, least-outstanding routing.
    # r0 (8 tokens) -> replica 0, busy until 2.0; r1 (2 tokens) -> replica 1, finishes at exactly 0.5.
    # r2 arrives at 0.5: replica 1's completion at 0.5 is applied first, so replica 1 is idle
    # (0 outstanding vs 1) and gets r2, which joins the batch replica 1 starts at 0.5.
    # (Were the arrival routed first, both would show 1 outstanding and the tie would pick replica 0.)
    raw = _raw(tmp_path, [(0.0, 10, 8), (0.0, 10, 2), (0.5, 10, 1)])
    raw["fleet"]["replicas"][0].update(count=2, perf_model={"name": "linear", "base_s": 0.25})
    _, df = run_raw(raw)
    assert df["finish_s"].tolist() == [2.0, 0.5, 0.75]
    assert df["replica"].tolist() == [0, 1, 1]
    assert df["first_scheduled_s"][2] == 0.5


def _pp_raw(tmp_path, rows, **engine):
    raw = _raw(tmp_path, rows, **engine)
    rep = raw["fleet"]["replicas"][0]
    rep.update(pipeline_parallel_size=2, perf_model={"name": "linear", "base_s": 0.25})
    return raw


def test_pipeline_keeps_two_micro_batches_in_flight(tmp_path):
    # pp=2, every step 0.25 s = two stages of 0.125 s; a 10-token budget puts each prompt in its own
    # micro-batch. A request sits out while its micro-batch is in the pipeline.
    #   0.000 A: r0 prefill   stage0 [0, .125]    stage1 [.125, .25]  -> r0 token 1 @ .25
    #   0.125 B: r1 prefill   stage0 [.125, .25]  stage1 [.25, .375]  -> r1 token 1 @ .375
    #   0.250 C: r0 decode (A landed)             -> r0 token 2 @ .5
    #   0.375 D: r1 decode (B landed)             -> r1 token 2 @ .625
    #   0.500 E: r0 decode -> r0 token 3 @ .75;   0.625 F: r1 decode -> r1 token 3 @ .875
    res, df = run_raw(_pp_raw(tmp_path, [(0.0, 10, 3), (0.0, 10, 3)], max_num_batched_tokens=10))
    assert df["first_scheduled_s"].tolist() == [0.0, 0.125]
    assert df["first_token_s"].tolist() == [0.25, 0.375]
    assert df["finish_s"].tolist() == [0.75, 0.875]
    assert res.metrics.replicas[0].iterations == 6
    assert res.metrics.replicas[0].busy_s == 6 * 0.125      # the first stage's occupancy


def test_a_lone_request_sees_the_whole_pipeline_latency(tmp_path):
    # one request cannot fill two micro-batches: each of its 4 steps takes the full 0.25 s (the bubble)
    _, df = run_raw(_pp_raw(tmp_path, [(0.0, 10, 4)]))
    assert df["finish_s"].tolist() == [1.0]


def test_max_num_seqs_counts_requests_in_flight(tmp_path):
    # max_num_seqs=1: r1 cannot be admitted while r0's micro-batch is in the pipeline, so nothing overlaps
    _, df = run_raw(_pp_raw(tmp_path, [(0.0, 10, 3), (0.0, 10, 3)], max_num_batched_tokens=10, max_num_seqs=1))
    assert df["finish_s"].tolist() == [0.75, 1.5]
