"""Policy registries: name -> (class, one-line description). Read only when a config is built."""
from __future__ import annotations

from . import admission, batching, eviction, routing

BATCHING = {
    "continuous": (batching.ContinuousBatching, "vLLM v1 continuous batching with a token budget (chunked prefill optional)"),
    "static": (batching.StaticBatching, "request-level batching: a new batch only when the previous one has drained"),
    "dynamic": (batching.DynamicBatching, "request-level batches launched when full or after a timeout (Triton)"),
    "sarathi": (batching.Sarathi, "decode-first with prompt chunks filling the token budget (Sarathi-Serve)"),
    "orca": (batching.Orca, "iteration-level batching with whole prompts (no chunked prefill)"),
    "prefill_first": (batching.PrefillFirst, "vLLM v0: whole prompts first, decodes pause while any can be admitted"),
    "priority": (batching.PriorityClasses, "admit by SLO-class priority, preempt the lowest priority first"),
    "edf": (batching.EarliestDeadlineFirst, "admit by first-token deadline (arrival + class TTFT SLO)"),
    "fair": (batching.FairShare, "weighted fair sharing between tenants (Virtual Token Counter)"),
    "sjf": (batching.ShortestJobFirst, "admit the shortest predicted output first (oracle or noisy predictor)"),
}
ROUTING = {
    "round_robin": (routing.RoundRobin, "cycle through replicas"),
    "random": (routing.Random, "uniformly random replica"),
    "least_outstanding": (routing.LeastOutstanding, "fewest waiting + running requests"),
    "least_kv": (routing.LeastKVUsage, "most free KV-cache blocks"),
    "power_of_two": (routing.PowerOfTwoChoices, "the less loaded of two random replicas"),
    "prefix_aware": (routing.PrefixAware, "longest cached prompt prefix, least loaded when imbalanced (SGLang)"),
    "tenant_pools": (routing.TenantPools, "each tenant on its own replicas; the others share the rest"),
    "session_affinity": (routing.SessionAffinity, "consistent hashing of the session id (sticky conversations)"),
    "capacity_weighted": (routing.CapacityWeighted, "fewest outstanding per unit of capacity (heterogeneous fleets)"),
    "canary": (routing.Canary, "a stable fraction of requests to one replica group (canary rollout)"),
    "cheapest_first": (routing.CheapestFirst, "lowest $ per token among replicas not yet busy, else capacity-weighted"),
}
ADMISSION = {
    "accept_all": (admission.AcceptAll, "admit every request"),
    "max_queue": (admission.MaxQueue, "reject when the cluster-wide waiting queue is full"),
    "token_bucket": (admission.TokenBucket, "per-tenant token buckets on request tokens (rate limiting)"),
    "slo_shedding": (admission.SLOShedding, "reject when the predicted TTFT exceeds the class's TTFT SLO"),
}
EVICTION = {
    "lru": (eviction.LRU, "least recently used cached block first"),
    "fifo": (eviction.FIFO, "oldest cached block first"),
    "lfu": (eviction.LFU, "fewest prefix hits first"),
    "gdsf": (eviction.GDSF, "cost-aware Greedy-Dual-Size-Frequency: cheap-to-recompute, cold blocks first"),
}
