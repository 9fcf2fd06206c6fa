"""The measured backend really executes batches: a KV cache that is used, grown, reused and freed."""
import numpy as np
import pytest

from conftest import BASE, run_raw
import copy

from servesim.hwmodels.catalog import get_model
from servesim.hwmodels.measured import MeasuredModel
from servesim.hwmodels.step_time import BatchShape
from servesim.sim.errors import ConfigError

TINY = get_model("servesim/tiny-llama")


def _forward(m, chunks, tokens):
    """Run m._forward on [(request id, cached, new)] with given token ids; returns the final hidden states
    as a float32 numpy array."""
    be = m.be
    work = [(m._ensure(r, c, n), c, n) for r, c, n in chunks]
    pos = np.concatenate([np.arange(c, c + n) for _, c, n in work])
    ends = np.cumsum([n for _, _, n in work])
    x = m._forward(work, be.asarray(np.asarray(tokens)), be.asarray(m.cos[pos]), be.asarray(m.sin[pos]), ends,
                   be.asarray(ends[-1:] - 1))
    if be.name == "numpy":
        assert x.dtype == np.float32                  # no silent promotion to float64 on the way
        return x
    return x.float().cpu().numpy()


def _backends():
    """numpy always; torch where it is installed (an optional extra: `pip install 'servesim[torch]'`)."""
    try:
        import torch  # noqa: F401
        return ["numpy", "torch"]
    except ImportError:
        return ["numpy"]


@pytest.mark.parametrize("backend", _backends())
def test_chunked_prefill_and_decode_reuse_the_cache_exactly(backend):
    """A 10-token prompt in one step, or as 6 + 4 tokens, or as 9 tokens then a decode token, ends in the
    same hidden state for the last token: later chunks attend to the K and V the earlier chunk cached."""
    m = MeasuredModel(TINY, backend=backend, seed=3)
    toks = np.random.default_rng(0).integers(0, TINY.vocab_size, 10)
    whole = _forward(m, [("a", 0, 10)], toks)
    _forward(m, [("b", 0, 6)], toks[:6])
    two = _forward(m, [("b", 6, 4)], toks[6:])
    _forward(m, [("c", 0, 9)], toks[:9])
    dec = _forward(m, [("c", 9, 1)], toks[9:])
    np.testing.assert_allclose(two[-1], whole[-1], rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(dec[-1], whole[-1], rtol=2e-4, atol=2e-4)
    assert [m.seqs[r].length for r in "abc"] == [10, 10, 10]
    # batched: both sequences in one step give each the same result as alone
    both = _forward(m, [("d", 0, 10), ("e", 0, 10)], np.concatenate([toks, toks]))
    np.testing.assert_allclose(both[9], whole[-1], rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(both[19], whole[-1], rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("backend", _backends())
def test_cache_grows_starts_from_prefix_hits_and_is_released(backend):
    m = MeasuredModel(TINY, backend=backend, warmup_steps=0)
    m.step_time(BatchShape([100], [0], [], 1, prefill_ids=[1]))
    cap = m.seqs[1].k[0].shape[1]
    assert m.seqs[1].length == 100 and cap >= 100
    for k in range(cap - 100 + 1):                      # decode past the first allocation: it grows
        m.step_time(BatchShape([], [], [100 + k], 1, decode_ids=[1]))
    assert m.seqs[1].length == cap + 1 and m.seqs[1].k[0].shape[1] > cap
    m.step_time(BatchShape([20], [32], [], 1, prefill_ids=[2]))   # 32 prompt tokens hit the prefix cache
    assert m.seqs[2].length == 52
    m.release(1)
    assert set(m.seqs) == {2}


def test_a_measured_run_frees_every_request_and_logs_every_step(tmp_path):
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"][0].update(gpu="H100-SXM", model="servesim/tiny-llama",
                                       perf_model={"name": "measured", "backend": "numpy"},
                                       engine={"max_num_batched_tokens": 64, "num_gpu_blocks_override": 12,
                                               "max_num_seqs": 8})
    raw["workload"].update(num_requests=12, arrival={"process": "all_at_once"},
                           lengths={"kind": "independent", "input": {"dist": "uniform", "low": 20, "high": 60},
                                    "output": {"dist": "uniform", "low": 2, "high": 30}})
    res, df = run_raw(raw)
    assert (df["outcome"] == "finished").all()
    assert df["preemptions"].sum() > 0                  # 12 blocks of 16 tokens: recompute preemptions happen
    model = res.step_models[0]
    assert model.seqs == {}                             # every finished or preempted request released its cache
    m = res.metrics.replicas[0]
    assert model.steps == m.iterations and m.busy_s > 0


def test_unsupported_models_and_backends_are_clear_errors():
    with pytest.raises(ConfigError, match="not a dense GQA/MHA model"):
        MeasuredModel(get_model("mistralai/Mixtral-8x7B-v0.1"))
    with pytest.raises(ConfigError, match="numpy backend runs on the CPU only"):
        MeasuredModel(TINY, backend="numpy", device="cuda")
