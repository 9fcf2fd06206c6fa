"""Policy registries: name -> (class, one-line description). Read only when a config is built."""
from __future__ import annotations

from . import admission, batching, eviction, routing

BATCHING = {
    "continuous": (batching.ContinuousBatching, "vLLM v1 continuous batching with a token budget (chunked prefill optional)"),
    "static": (batching.StaticBatching, "request-level batching: a new batch only when the previous one has drained"),
}
ROUTING = {
    "round_robin": (routing.RoundRobin, "cycle through replicas"),
    "random": (routing.Random, "uniformly random replica"),
    "least_outstanding": (routing.LeastOutstanding, "fewest waiting + running requests"),
}
ADMISSION = {
    "accept_all": (admission.AcceptAll, "admit every request"),
    "max_queue": (admission.MaxQueue, "reject when the cluster-wide waiting queue is full"),
}
EVICTION = {
    "lru": (eviction.LRU, "least recently used cached block first"),
    "fifo": (eviction.FIFO, "oldest cached block first"),
    "lfu": (eviction.LFU, "fewest prefix hits first"),
}
