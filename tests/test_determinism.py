import pandas as pd

from conftest import run_raw


def _run(raw, seed):
    raw = {**raw, "seed": seed}
    raw["fleet"] = {"replicas": [{"gpu": "H100-SXM", "model": "meta-llama/Llama-3.1-8B", "count": 3}]}
    raw["policies"] = {"routing": {"name": "random"}}
    return run_raw(raw)[1]


def test_same_seed_same_table_other_seed_differs(base_raw):
    a, b, c = _run(base_raw, 3), _run(base_raw, 3), _run(base_raw, 4)
    pd.testing.assert_frame_equal(a, b)
    assert not a["arrival_s"].equals(c["arrival_s"])
    assert not a["replica"].equals(c["replica"])
