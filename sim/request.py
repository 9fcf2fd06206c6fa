"""A request and its sequence state, in vLLM v1's terms: no phases, only tokens computed vs known.

`num_tokens` = prompt + outputs sampled so far; `num_computed` = tokens whose KV is in the cache.
A step that brings num_computed up to num_tokens samples one new output token.
"""
from __future__ import annotations

import math

FINISHED, REJECTED, FAILED = "finished", "rejected", "failed"


class Request:
    __slots__ = (
        "id", "arrival", "prompt_tokens", "output_tokens", "tenant", "slo_class", "session", "model", "job",
        "prefix_ids", "prefix_block_size",
        # sequence state
        "num_computed", "num_output", "blocks", "block_hashes", "num_cached_tokens", "preemptions",
        "num_loaded_tokens", "load_s", "swapped_tokens",
        # latency attribution (sim/attribution.py): a preemption's cost runs from it until the KV is back
        "lost", "preempted_at", "preempted_s", "preempted_ttft_s", "kv_load_s",
        # prefill/decode disaggregation: leaves its prefill replica after the first token, KV sent to a decode one
        "handoff", "transferred", "prefill_replica", "kv_transfer_s",
        # agentic sessions with retention keep: pin this turn's KV under this key when it finishes
        "retain_key",
        # retries (sim/faults.py): attempt 0 is the original; later ones keep its arrival and id as `origin`
        "attempt", "origin", "sent", "retried",
        # record
        "replica", "first_scheduled", "first_token", "finish", "last_token", "outcome", "reason", "on_finish",
    )

    def __init__(self, id: int, arrival: float, prompt_tokens: int, output_tokens: int, *, tenant: str = "default",
                 slo_class: str = "default", session: int = -1, prefix_ids=None, prefix_block_size: int = 0,
                 model: str | None = None, job: int = -1):
        self.id = id
        self.arrival = arrival
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.tenant = tenant
        self.slo_class = slo_class
        self.session = session
        self.model = model                        # the model it asks for (None: any replica serves it)
        self.job = job                            # its batch job (sim/batch_jobs.py), -1 for online traffic
        self.prefix_ids = prefix_ids              # trace block ids (prefix-chained), or None
        self.prefix_block_size = prefix_block_size
        self.num_computed = 0
        self.num_output = 0
        self.blocks: list[int] = []
        self.block_hashes: list | None = None     # engine-block hashes of the full prompt blocks, lazily built
        self.num_cached_tokens = 0
        self.preemptions = 0
        self.num_loaded_tokens = 0                # prompt tokens loaded back from KV offload tiers
        self.load_s = 0.0                         # loading time owed by the step that admits it
        self.swapped_tokens = 0                   # KV tokens swapped out to CPU memory while it waits
        self.lost = 0                             # tokens computed when last preempted, until recomputed (0: none)
        self.preempted_at = math.nan              # when the preemption being recovered from happened
        self.preempted_s = 0.0                    # seconds from preemptions until the KV was back
        self.preempted_ttft_s = 0.0               # ... of them before the first token
        self.kv_load_s = 0.0                      # seconds its own prefix KV loads from offload tiers took
        self.handoff = False
        self.transferred = False                  # its KV arrived from a prefill replica: admitted without compute
        self.prefill_replica = -1
        self.kv_transfer_s = 0.0
        self.retain_key = None
        self.attempt = 0
        self.origin = id                          # the request as the client sees it: the first attempt's id
        self.sent = arrival                       # when this attempt was sent (a retry: after the backoff)
        self.retried = False                      # failed, and a later attempt took over
        self.replica = -1
        self.first_scheduled = math.nan
        self.first_token = math.nan
        self.finish = math.nan
        self.last_token = math.nan
        self.outcome = ""
        self.reason = ""
        self.on_finish = None                     # callback(request) for closed-loop clients

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.num_output

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    def __repr__(self) -> str:
        return (f"Request({self.id}, t={self.arrival:g}, prompt={self.prompt_tokens}, out={self.num_output}/"
                f"{self.output_tokens}, computed={self.num_computed}, blocks={len(self.blocks)})")


def block_hashes(req: Request, block_size: int) -> list:
    """Hashes of the request's full blocks of `block_size` tokens, prompt and output alike: as vLLM hashes every
    full block, so a request preempted and recomputed finds its generated tokens' blocks still cached.

    With trace block ids (already prefix-chained, as in Mooncake and kv-cache-tester), the engine
    block ending at token e is identified by the trace block holding token e-1 and e itself: equal
    prefixes give equal keys. Without ids, keys are private to the request, so only its own blocks
    are reused (after a recompute preemption), never another request's.
    """
    n = req.total_tokens // block_size
    if req.prefix_ids is None:
        return [(-1 - req.id, j) for j in range(n)]
    tb, ids = req.prefix_block_size, req.prefix_ids
    # only blocks inside the trace's full blocks are shareable: those ending at or before token K x tb
    shared = min(n, min(len(ids), req.prompt_tokens // tb) * tb // block_size)
    out = [(ids[(end - 1) // tb], end) for end in range(block_size, (shared + 1) * block_size, block_size)]
    # the remaining full blocks (the prompt's rest, then its output) are private to the request
    out.extend((-1 - req.id, j) for j in range(shared, n))
    return out
