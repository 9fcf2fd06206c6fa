"""Agentic multi-turn sessions replayed closed-loop from kv-cache-tester conversations (Claude Code).

A conversation is a list of turns and sub-agent groups. A turn is sent `think_time` seconds (the trace's
client delay, times think_time_scale) after the previous turn's response ended (its first turn at the
session's start). Consecutive sub-agent markers form a group: their nested conversations start together
when the parent reaches them and the parent goes on only once all of them are done (as an agent waits for
the tools it called). Block ids are scoped per conversation file, so turns share their prefixes through
the prefix cache exactly as the recorded session did. The open-loop trace loader (traces/loaders.py) replays
the same conversations at their recorded times instead.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

from servesim.sim.errors import TraceError

BLOCK = 64


@dataclass
class Turn:
    prompt: int
    output: int
    ids: list
    think_s: float
    t: float            # when it was sent in the recorded session (s since its conversation's start)


@dataclass
class Conversation:
    items: list = field(default_factory=list)   # Turn, or a list of Conversations run in parallel
    name: str = ""
    start: float = 0.0                          # a sub-agent: its marker's t in the parent's recorded clock

    def turns(self) -> int:
        return sum(1 if isinstance(x, Turn) else sum(c.turns() for c in x) for x in self.items)


def _parse(reqs, scope: int, where: str, f: Path, name: str, start: float = 0.0) -> Conversation:
    conv = Conversation(name=name, start=start)
    group: list = []
    for k, r in enumerate(reqs):
        if r.get("type") == "subagent":
            group.append(_parse(r.get("requests", []), scope, f"{where}[{k}].requests", f,
                                f"{name}/{r.get('agent_id', k)}", r["t"]))
            continue
        if group:
            conv.items.append(group)
            group = []
        n, o, ids = r["in"], r["out"], r["hash_ids"]
        if not (isinstance(n, int) and n >= 1 and isinstance(o, int) and o >= 1 and len(ids) == n // BLOCK):
            raise TraceError(f"{f}: {where}[{k}]: expected in >= 1, out >= 1 and in // {BLOCK} hash_ids "
                             f"(got in={n!r}, out={o!r}, {len(ids)} ids)")
        think = r.get("think_time", 0.0) or 0.0
        if not isinstance(think, (int, float)) or think < 0:
            raise TraceError(f"{f}: {where}[{k}].think_time: expected seconds >= 0, got {think!r}")
        conv.items.append(Turn(n, o, [scope * 2**32 + h for h in ids], float(think), float(r["t"])))
    if group:
        conv.items.append(group)
    return conv


def load_conversations(path: Path) -> list[Conversation]:
    files = sorted(p for p in path.iterdir() if p.name.endswith((".json", ".json.gz"))) if path.is_dir() else [path]
    if not files:
        raise TraceError(f"{path}: no trace_*.json(.gz) conversation files in this folder")
    out = []
    for c, f in enumerate(files):
        opener = gzip.open if f.name.endswith(".gz") else open
        try:
            with opener(f, "rt", encoding="utf-8") as fh:
                doc = json.load(fh)
            if doc["block_size"] != BLOCK:
                raise TraceError(f"{f}: block_size {doc['block_size']}; every kv-cache-tester trace so far has "
                                 f"{BLOCK}-token blocks")
            out.append(_parse(doc["requests"], c, "requests", f, f.name.split(".")[0]))
        except (json.JSONDecodeError, KeyError, TypeError, OSError, EOFError, UnicodeDecodeError) as e:
            raise TraceError(f"{f}: not a kv-cache-tester conversation ({type(e).__name__}: {e})") from None
    return out


def recorded_requests(conv: Conversation, t0: float):
    """(time, turn) of every turn at its recorded time, sub-agents at their marker's time plus their own t."""
    for item in conv.items:
        if isinstance(item, Turn):
            yield t0 + item.t, item
        else:
            for sub in item:
                yield from recorded_requests(sub, t0 + sub.start)


@dataclass
class SessionLog:
    """One session's record: requests it sent (sub-agents included), when it started and ended, its think time."""
    session: int
    name: str
    start: float
    end: float = float("nan")
    think_s: float = 0.0
    requests: list = field(default_factory=list)
