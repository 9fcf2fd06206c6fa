"""An exact-match response cache in front of the fleet (as API gateways and semantic-cache layers keep
one, e.g. GPTCache, LiteLLM's cache): a request whose prompt is identical to one already answered gets
that answer at once, with no GPU work.

Identity needs the prompt's content: two requests match when they have the same prompt length and the
same trace block ids (Mooncake and kv-cache-tester traces carry them). Requests without block ids
(length-only traces, synthetic workloads) never match. An answer enters the cache when its request
finishes; the cache keeps the `capacity` most recently used answers.
"""
from __future__ import annotations

from collections import OrderedDict


class ResponseCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict = OrderedDict()
        self.hits = 0

    @staticmethod
    def key(req):
        if req.prefix_ids is None:
            return None
        return (req.prompt_tokens, tuple(req.prefix_ids))

    def lookup(self, req) -> bool:
        k = self.key(req)
        if k is None or k not in self.entries:
            return False
        self.entries.move_to_end(k)
        self.hits += 1
        return True

    def store(self, req) -> None:
        k = self.key(req)
        if k is None:
            return
        self.entries[k] = None
        self.entries.move_to_end(k)
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
