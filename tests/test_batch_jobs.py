"""Batch jobs with deadlines (sim/batch_jobs.py) and requests that name their model: exact timelines on a
linear step model (every step takes base_s whatever it holds), job ordering, online-first queueing and
preemption, the report, and bad input."""
import copy

import numpy as np
import pytest

from conftest import BASE, run_fast_and_plain, run_raw
from servesim.sim.batch_jobs import job_table
from servesim.sim.config import parse_config
from servesim.sim.errors import ConfigError
from servesim.sim.report import build_report

LLAMA, QWEN = "meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B"


def _fixed(prompt, output):
    return {"kind": "independent", "input": {"dist": "fixed", "value": prompt},
            "output": {"dist": "fixed", "value": output}}


def _raw(tmp_path, online, jobs, *, max_num_seqs=2, fill_to=None, order="edf", replicas=None, **extra):
    """One linear-model replica (1 s steps) unless given."""
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"] = replicas or [{
        "gpu": "H100-SXM", "model": LLAMA, "perf_model": {"name": "linear", "base_s": 1.0},
        "engine": {"enable_prefix_caching": False, "max_num_seqs": max_num_seqs}}]
    parts = [{"kind": "batch", "jobs": jobs}]
    if online:                                   # one online request: (arrival, prompt, output)
        a, p, o = online
        parts.insert(0, {"kind": "synthetic", "num_requests": 1, "lengths": _fixed(p, o), "start_s": a,
                         "arrival": {"process": "all_at_once"}})
    raw["workload"] = {"kind": "mix", "parts": parts}
    raw["policies"] = {"batch_jobs": {"order": order, **({"fill_to": fill_to} if fill_to else {})}}
    raw.update(extra)
    return raw


def _job(name, n, deadline, submit=0.0, prompt=16, output=3, model=None):
    return {"name": name, "submit_s": submit, "deadline_s": deadline, "num_requests": n,
            "lengths": _fixed(prompt, output), **({"model": model} if model else {})}


def test_batch_fills_idle_room_and_yields_to_an_online_request(tmp_path):
    # 4 batch requests (16 + 3 tokens) at t=0 on a replica of max_num_seqs 2 (fill_to defaults to it); one online
    # request (16 + 2) at t=0.5. Timeline, 1 s steps:
    #   t=0  b0, b1 dispatched (room for 2), b2, b3 wait at the cluster; step 1: b0, b1 prefill
    #   t=1  o waits with both slots taken: b1 (latest admitted batch) is preempted, queued behind o;
    #        step 2: b0 decodes, o prefills (first token at 2)
    #   t=3  b0 and o finish; b2 dispatched into the freed room; step 4: b1 recomputes (17 tokens), b2 prefills
    #   t=5  b1 finishes (3rd token), b3 dispatched; t=6 b2 finishes; b3 finishes at 8
    raw = _raw(tmp_path, (0.5, 16, 2), [_job("evals", 4, deadline=7.0)])
    res, df = run_raw(raw)
    batch, online = df[df["job"] == "evals"], df[df["job"] == ""]
    assert batch["finish_s"].tolist() == [3.0, 5.0, 6.0, 8.0]
    assert batch["first_scheduled_s"].tolist() == [0.0, 0.0, 3.0, 5.0]
    assert batch["preemptions"].tolist() == [0, 1, 0, 0]
    assert (online["first_token_s"].tolist(), online["finish_s"].tolist()) == ([2.0], [3.0])
    jt = job_table(res)
    row = jt.iloc[0]
    assert (row["completed_s"], row["deadline_s"], row["met_deadline"], row["lateness_s"]) == (8.0, 7.0, False, 1.0)
    assert (row["finished"], row["finished_by_deadline"], row["preemptions"], row["output_tokens"]) == (4, 3, 1, 12)
    rep = build_report(res, df)
    assert rep["batch_jobs"]["met_deadline"] == 0 and rep["batch_jobs"]["finished_by_deadline"] == 3
    # latency and SLO tables are the online request's alone: TTFT 1.5 s, one request judged
    assert rep["latency_ms"]["ttft"]["p50"] == pytest.approx(1500.0)
    assert rep["slo"]["classes"]["default"]["requests"] == 1
    # a batch request meets its "SLO" when it finishes by its job's deadline
    assert rep["tenants"]["batch"]["slo_attainment"] == 0.75


def test_fill_to_limits_what_batch_work_takes(tmp_path):
    # fill_to 1: one batch request at a time, each 3 steps: done at 3, 6, 9; nothing to preempt
    res, df = run_raw(_raw(tmp_path, None, [_job("evals", 3, deadline=9.0)], max_num_seqs=4, fill_to=1))
    assert df["finish_s"].tolist() == [3.0, 6.0, 9.0]
    assert bool(job_table(res).iloc[0]["met_deadline"])
    # fill_to 4 (the default, max_num_seqs): all three run together, done at 3
    res, df = run_raw(_raw(tmp_path, None, [_job("evals", 3, deadline=9.0)], max_num_seqs=4))
    assert df["finish_s"].tolist() == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("order, first", [("edf", "urgent"), ("fifo", "early")])
def test_jobs_go_by_deadline_or_by_submission(tmp_path, order, first):
    # one at a time (fill_to 1): "early" is submitted first with a late deadline, "urgent" a moment later with an
    # early one. The first dispatch happens at early's submission, so early's first request runs first either way;
    # after it, EDF serves urgent's two requests, FIFO early's second.
    jobs = [_job("early", 2, deadline=100.0, submit=0.0), _job("urgent", 2, deadline=5.0, submit=0.5)]
    res, df = run_raw(_raw(tmp_path, None, jobs, fill_to=1, order=order))
    starts = df.sort_values("first_scheduled_s")["job"].tolist()
    assert starts[0] == "early"
    assert starts[1:3] == ([first, first] if first == "urgent" else ["early", "urgent"])
    # urgent is due at 5.5: missed either way (done at 9 under EDF, 12 under FIFO)
    assert dict(zip(job_table(res)["job"], job_table(res)["met_deadline"])) == {"early": True, "urgent": False}
    done = dict(zip(job_table(res)["job"], job_table(res)["completed_s"]))
    assert done == ({"early": 12.0, "urgent": 9.0} if order == "edf" else {"early": 6.0, "urgent": 12.0})


def test_online_requests_queue_ahead_of_waiting_batch_work(tmp_path):
    # max_num_seqs 1, fill_to 3: three batch requests sit on the replica (one running, two waiting). An online
    # request arriving at 0.5 takes the slot at 1 (the running batch request is preempted) ahead of both.
    raw = _raw(tmp_path, (0.5, 16, 2), [_job("evals", 3, deadline=50.0)], max_num_seqs=1, fill_to=3)
    res, df = run_raw(raw)
    online = df[df["job"] == ""].iloc[0]
    assert (online["first_scheduled_s"], online["finish_s"]) == (1.0, 3.0)
    batch = df[df["job"] == "evals"]
    # b0 (preempted at 1 with its first token) goes back first among batch requests: at 3 it recomputes its 17
    # tokens (2nd token at 4, 3rd at 5); then b1 (5 .. 8), b2 (8 .. 11)
    assert batch["first_scheduled_s"].tolist() == [0.0, 5.0, 8.0]
    assert batch["finish_s"].tolist() == [5.0, 8.0, 11.0]
    assert batch["preemptions"].tolist() == [1, 0, 0]


def test_memory_pressure_preempts_batch_work_first(tmp_path):
    # 6 blocks of 16 tokens; an online request (16 + 40) admitted first, then two batch requests (16 + 40). Each
    # grows a block every 16 tokens: when the pool runs dry the victim is a batch request, never the online one
    raw = _raw(tmp_path, (0.0, 16, 40), [_job("evals", 2, deadline=500.0, output=40)], max_num_seqs=3)
    raw["fleet"]["replicas"][0]["engine"]["num_gpu_blocks_override"] = 6
    res, df = run_raw(raw)
    assert (df["outcome"] == "finished").all()
    assert df.loc[df["job"] == "", "preemptions"].tolist() == [0]
    assert df.loc[df["job"] == "evals", "preemptions"].sum() >= 1


def test_batch_jobs_fast_decode_matches_the_plain_path(tmp_path):
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"] = [{"count": 2, "gpu": "H100-SXM", "model": LLAMA,
                                 "engine": {"max_num_seqs": 16, "num_gpu_blocks_override": 400}}]
    raw["workload"] = {"kind": "mix", "parts": [
        {"kind": "synthetic", "num_requests": 150, "arrival": {"process": "poisson", "rate": 15.0},
         "lengths": {"kind": "independent", "input": {"dist": "uniform", "low": 20, "high": 600},
                     "output": {"dist": "uniform", "low": 2, "high": 120}}},
        {"kind": "batch", "jobs": [
            {"name": "a", "submit_s": 1.0, "deadline_s": 20.0, "num_requests": 80,
             "lengths": {"kind": "independent", "input": {"dist": "uniform", "low": 50, "high": 400},
                         "output": {"dist": "uniform", "low": 20, "high": 200}}},
            {"name": "b", "submit_s": 3.0, "deadline_s": 5.0, "num_requests": 40, "lengths": _fixed(100, 50)}]}]}
    (res_f, df_f), (res_p, df_p) = run_fast_and_plain(raw)
    for c in ("first_scheduled_s", "first_token_s", "finish_s"):
        np.testing.assert_allclose(df_f[c].to_numpy(float), df_p[c].to_numpy(float), rtol=1e-9, atol=0)
    assert df_f["preemptions"].tolist() == df_p["preemptions"].tolist()
    assert df_f["preemptions"].sum() > 0                    # online work made batch work yield
    assert (df_f["outcome"] == "finished").all() and len(df_f) == 270     # nothing lost
    assert res_f.metrics.itl.n == res_p.metrics.itl.n
    # EDF: job b (due at 8) overtakes a's requests still at the cluster when it arrives
    jt = job_table(res_f).set_index("job")
    assert jt.loc["b", "completed_s"] < jt.loc["a", "completed_s"]


def _two_models(**extra):
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"] = [{"name": "llama", "count": 2, "gpu": "H100-SXM", "model": LLAMA},
                                {"name": "qwen", "count": 1, "gpu": "H100-SXM", "model": QWEN}]
    syn = BASE["workload"]
    raw["workload"] = {"kind": "mix", "parts": [
        {**syn, "tenant": "chat", "model": "Llama-3.1-8B"},     # an alias of the catalog name
        {**syn, "tenant": "code", "model": QWEN},
        {**syn, "tenant": "any"}]}
    raw.update(extra)
    return raw


def test_requests_naming_a_model_go_only_to_its_replicas():
    res, df = run_raw(_two_models())
    served = df.groupby("tenant")["replica"].unique()
    assert sorted(served["chat"]) == [0, 1]
    assert sorted(served["code"]) == [2]
    assert sorted(served["any"]) == [0, 1, 2]                   # naming no model: any replica
    assert (df.loc[df["tenant"] == "code", "model"] == QWEN).all()
    rep = build_report(res, df)
    models = rep["models"]
    assert set(models) == {LLAMA, QWEN}
    assert models[QWEN]["requests"] == 200 + int((df.loc[df["tenant"] == "any", "replica"] == 2).sum())
    assert sum(m["requests"] for m in models.values()) == 600


def test_batch_jobs_for_a_model_run_on_its_replicas(tmp_path):
    replicas = [{"name": "llama", "gpu": "H100-SXM", "model": LLAMA, "perf_model": {"name": "linear", "base_s": 1.0}},
                {"name": "qwen", "gpu": "H100-SXM", "model": QWEN, "perf_model": {"name": "linear", "base_s": 1.0}}]
    raw = _raw(tmp_path, None, [_job("q", 3, deadline=10.0, model=QWEN), _job("l", 2, deadline=10.0, model=LLAMA)],
               replicas=replicas)
    res, df = run_raw(raw)
    assert df.loc[df["job"] == "q", "replica"].tolist() == [1, 1, 1]
    assert df.loc[df["job"] == "l", "replica"].tolist() == [0, 0]


def test_disaggregated_requests_decode_on_their_models_replicas():
    raw = _two_models(disaggregation={"bandwidth_gbps": 50})
    raw["fleet"]["replicas"] = [
        {"name": "llama-p", "gpu": "H100-SXM", "model": LLAMA, "role": "prefill"},
        {"name": "qwen-p", "gpu": "H100-SXM", "model": QWEN, "role": "prefill"},
        {"name": "llama-d", "gpu": "H100-SXM", "model": LLAMA, "role": "decode"},
        {"name": "qwen-d", "gpu": "H100-SXM", "model": QWEN, "role": "decode"}]
    res, df = run_raw(raw)
    moved = df[df["prefill_replica"] >= 0]
    assert len(moved) > 500
    # prefill replica 0 and decode replica 2 serve Llama; 1 and 3 Qwen: every KV stays within its model
    assert ((moved["prefill_replica"] + 2) == moved["replica"]).all()
    code = df[df["tenant"] == "code"]
    assert (code["replica"] == np.where(code["output_tokens"] > 1, 3, 1)).all()   # one token: done at prefill


def test_bad_model_and_job_input(tmp_path):
    raw = _two_models()
    raw["workload"]["parts"][1]["model"] = "meta-llama/Llama-3.1-70B"
    with pytest.raises(ConfigError, match=r"workload.parts\[1\].model: no replica serves meta-llama/Llama-3.1-70B"):
        run_raw(raw)
    raw["workload"]["parts"][1]["model"] = "no-such-model"
    with pytest.raises(ConfigError, match=r"workload.parts\[1\].model"):
        run_raw(raw)
    raw = _two_models(policies={"routing": {"name": "canary", "group": "qwen"}})
    with pytest.raises(ConfigError, match="names fixed replicas; requests that name a model"):
        parse_config(raw)
    raw = _raw(tmp_path, None, [_job("x", 1, 5.0), _job("x", 1, 5.0)])
    with pytest.raises(ConfigError, match=r"jobs\[\].name: job names must be distinct"):
        parse_config(raw)
    raw = _raw(tmp_path, None, [{**_job("x", 1, 5.0), "deadline_s": 0}])
    with pytest.raises(ConfigError, match=r"workload.parts\[0\].jobs\[0\].deadline_s"):
        parse_config(raw)


def test_replicas_the_autoscaler_adds_take_batch_work():
    # one active replica of three; a job of 300 requests fills it to fill_to (32), far above the concurrency
    # target (8): the autoscaler starts the other two and each takes batch requests once up; nothing is lost
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"] = [{"count": 3, "gpu": "H100-SXM", "model": LLAMA}]
    raw["workload"] = {"kind": "batch", "jobs": [_job("evals", 300, deadline=600.0, prompt=500, output=200)]}
    raw["policies"] = {"batch_jobs": {"fill_to": 32}}
    raw["autoscaling"] = {"min_replicas": 1, "metric": "concurrency", "target": 8, "interval_s": 1.0,
                          "cold_start": {"load_gbps": 16.0, "engine_startup_s": 2.0}}
    res, df = run_raw(raw)
    assert (df["outcome"] == "finished").all() and len(df) == 300
    up = {e["replica"]: e["t"] for e in res.autoscaling["events"] if e["to"] == "active"}
    assert set(up) >= {1, 2}
    for i in (1, 2):
        mine = df[df["replica"] == i]
        assert len(mine) > 0 and mine["first_scheduled_s"].min() >= up[i]
