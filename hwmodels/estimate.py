"""`estimate`: the step time of one batch, with a per-op breakdown (Python API and CLI)."""
from __future__ import annotations

from .catalog import get_gpu, get_model
from .memory import engine_constants
from .roofline import LAYER_OPS, RooflineModel
from .step_time import BatchShape


def estimate(gpu: str, model: str, tp: int = 1, pp: int = 1, dtype: str = "bf16", kv_dtype: str | None = None,
             prefill: list[tuple[int, int]] = (), decode: list[int] = (), overhead_s: float = 0.0,
             ep: bool = False) -> dict:
    """Seconds for one iteration that prefills `prefill` [(chunk_tokens, cached_tokens), ...] and decodes
    one token for each context length in `decode`. Returns the total and, per op, seconds, useful FLOPs and
    bytes for the whole step (and per layer for layer ops), with the side of the roofline ridge it sits on."""
    m, g = get_model(model), get_gpu(gpu)
    if kv_dtype is None:
        kv_dtype = "bf16" if dtype in engine_constants()["weight_only_dtypes"] else dtype
    rm = RooflineModel(m, g, tp=tp, pp=pp, dtype=dtype, kv_dtype=kv_dtype, overhead_s=overhead_s, ep=ep)
    shape = BatchShape([c for c, _ in prefill], [x for _, x in prefill], list(decode),
                       num_sampled=len(prefill) + len(decode))
    st = rm.step_time(shape)
    layers = rm.layers
    ops = {}
    for name, (sec, flops, nbytes) in rm.breakdown(shape).items():
        compute = flops / rm.peak
        memory = nbytes / rm.bw
        ops[name] = {"seconds": sec, "flops": flops, "bytes": nbytes,
                     "per_layer_s": sec / layers if name in LAYER_OPS else None,
                     "bound": "compute" if compute > memory else ("memory" if nbytes else "other")}
    return {"gpu": g.name, "model": m.name, "tp": tp, "pp": pp, "dtype": dtype, "layers": m.num_layers,
            "tokens": shape.num_tokens, "seconds": st.seconds, "flops": st.flops, "bytes": st.bytes, "ops": ops}
