"""The exact-match response cache: hits only for identical prompts already answered, LRU capacity."""
import copy
import json

from conftest import BASE, build_report, run_raw


def _trace(tmp_path, rows):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"timestamp": t, "input_length": n, "output_length": 20, "hash_ids": ids}) + "\n"
                            for t, n, ids in rows))
    return str(path)


def _run(tmp_path, rows, capacity=100):
    raw = copy.deepcopy(BASE)
    raw["policies"] = {"response_cache": {"enabled": True, "capacity": capacity}}
    raw["workload"] = {"kind": "trace", "path": _trace(tmp_path, rows)}
    return run_raw(raw)


A, B = [1, 2], [3, 4]


def test_an_answered_prompt_is_served_at_once_and_an_unanswered_one_is_not(tmp_path):
    # A at 0; the same prompt at 1 ms (A still running: not answered yet); again at 100 s (answered); a
    # different prompt with the same block ids but another length at 101 s (no match)
    res, df = _run(tmp_path, [(0, 1000, A), (1, 1000, A), (100_000, 1000, A), (101_000, 900, A)])
    assert list(df["reason"]) == ["", "", "response_cache", ""]
    hit = df.iloc[2]
    assert hit["ttft_s"] == 0 and hit["e2e_s"] == 0 and hit["replica"] == -1 and hit["outcome"] == "finished"
    assert build_report(res, df)["requests"]["from_response_cache"] == 1


def test_the_cache_keeps_the_most_recently_used_answers(tmp_path):
    rows = [(0, 1000, A), (50_000, 1000, B), (100_000, 1000, A)]
    _, df = _run(tmp_path, rows, capacity=1)                 # B's answer pushed A's out
    assert list(df["reason"]) == ["", "", ""]
    _, df = _run(tmp_path, rows, capacity=2)
    assert list(df["reason"]) == ["", "", "response_cache"]


def test_requests_without_content_identity_never_match(tmp_path):
    raw = copy.deepcopy(BASE)
    raw["policies"] = {"response_cache": {"enabled": True}}
    raw["workload"]["lengths"] = {"kind": "independent", "input": {"dist": "fixed", "value": 100},
                                  "output": {"dist": "fixed", "value": 5}}
    _, df = run_raw(raw)
    assert (df["reason"] != "response_cache").all()
