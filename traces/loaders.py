"""Trace loaders. Each returns a Trace of numpy columns; a malformed row is a TraceError naming file and line.

Formats (plain or .gz):
- azure:    CSV `TIMESTAMP,ContextTokens,GeneratedTokens` (Azure LLM inference 2023)
- mooncake: JSONL `{"timestamp": ms, "input_length", "output_length", "hash_ids": [...]}` (512-token blocks)
- lengths:  CSV `num_prefill_tokens,num_decode_tokens[,...]` (ShareGPT / arXiv length pairs; no times)
- servesim: CSV `arrival_s,prompt_tokens,output_tokens`
- kv_cache_tester: a folder of `trace_NNNN.json[.gz]` files, one agentic (Claude Code) conversation each:
  requests with `t` (s since the conversation's first request), `in`, `out`, `hash_ids` (64-token blocks,
  scoped per conversation) and nested sub-agent requests. There is no common clock across conversations:
  conversation i starts at i x conversation_interval_s.
"""
from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from servesim.sim.errors import TraceError

DATA_DIR = Path(__file__).parent / "data"
FORMATS = ("azure", "mooncake", "lengths", "servesim", "kv_cache_tester")


@dataclass
class Trace:
    prompt: np.ndarray
    output: np.ndarray
    arrival: np.ndarray | None = None       # seconds from the first request, non-decreasing
    prefix_ids: list | None = None          # per request: prefix-chained block ids
    prefix_block_size: int = 0
    source: str = ""
    sessions: np.ndarray | None = None      # per request: its conversation (kv_cache_tester)

    def __len__(self) -> int:
        return int(self.prompt.size)


def resolve_path(path: str, base_dir: Path | None = None) -> Path:
    """`bundled:NAME` is a sample shipped in servesim.traces/data; relative paths are tried against
    the config file's folder, then the working directory."""
    if path.startswith("bundled:"):
        p = DATA_DIR / path[len("bundled:"):]
        if not (p.is_file() or (p.is_dir() and p.name != "LICENSES")):
            avail = ", ".join(sorted(f.name for f in DATA_DIR.iterdir() if f.name not in ("LICENSES", "README.md")))
            raise TraceError(f"no bundled trace {path!r}; bundled: {avail}")
        return p
    p = Path(path).expanduser()
    tried = [p] if p.is_absolute() else ([base_dir / p] if base_dir else []) + [Path.cwd() / p]
    for c in tried:
        if c.is_file() or c.is_dir():
            return c
    raise TraceError(f"trace file not found: {path} (looked at {', '.join(str(c) for c in tried)})")


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "kv_cache_tester"
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".jsonl") or name.endswith(".json"):
        return "mooncake"
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as f:
        header = f.readline().strip()
    if header.startswith("TIMESTAMP"):
        return "azure"
    if header.startswith("num_prefill_tokens"):
        return "lengths"
    if header.startswith("arrival_s"):
        return "servesim"
    raise TraceError(f"{path}: cannot tell the trace format from header {header[:80]!r}; "
                     f"set workload format to one of {', '.join(FORMATS)}")


def _read_csv(path: Path, columns: list[str], as_text: bool = False) -> pd.DataFrame:
    """The CSV's cells, typed by pandas (integer columns come as int64 at once) or, as_text, as the strings
    written (what an error message quotes)."""
    try:
        df = pd.read_csv(path, dtype=str if as_text else None, keep_default_na=False)
    except pd.errors.ParserError as e:
        raise TraceError(f"{path}: malformed CSV: {e}") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise TraceError(f"{path}: cannot read: {e}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise TraceError(f"{path}: missing column(s) {', '.join(missing)}; header has {', '.join(df.columns)}")
    if df.empty:
        raise TraceError(f"{path}: no rows")
    return df


def _int_columns(df: pd.DataFrame, cols: list[str], path: Path, minimum: int) -> list[np.ndarray]:
    """The columns as int64 arrays. Columns pandas read as integers only need their minimum checked; anything
    else (or a value below minimum) is checked cell by cell on the text, so the error quotes the cell."""
    out = []
    for col in cols:
        v = df[col]
        if v.dtype.kind == "i" and (v.size == 0 or v.min() >= minimum):
            out.append(v.to_numpy(dtype=np.int64))
        else:
            text = _read_csv(path, cols, as_text=True)
            return [_int_column(text, c, path, minimum) for c in cols]
    return out


def _int_column(df: pd.DataFrame, col: str, path: Path, minimum: int) -> np.ndarray:
    v = pd.to_numeric(df[col], errors="coerce")
    bad = v.isna() | (v < minimum) | (v != np.floor(v))
    if bad.any():
        i = int(np.argmax(bad.to_numpy()))
        raise TraceError(f"{path}:{i + 2}: column {col} is {df[col].iloc[i]!r}; expected an integer >= {minimum}")
    return v.to_numpy(dtype=np.int64)


def load_azure(path: Path) -> Trace:
    df = _read_csv(path, ["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
    ts = pd.to_datetime(df["TIMESTAMP"], format="%Y-%m-%d %H:%M:%S.%f", errors="coerce")
    if ts.isna().any():
        i = int(np.argmax(ts.isna().to_numpy()))
        raise TraceError(f"{path}:{i + 2}: TIMESTAMP {df['TIMESTAMP'].iloc[i]!r} is not 'YYYY-MM-DD HH:MM:SS.fffffff'")
    t = (ts - ts.iloc[0]).dt.total_seconds().to_numpy()
    _check_sorted(t, path, 2)
    return Trace(*_int_columns(df, ["ContextTokens", "GeneratedTokens"], path, 1), t, source=str(path))


def load_lengths(path: Path) -> Trace:
    df = _read_csv(path, ["num_prefill_tokens", "num_decode_tokens"])
    return Trace(*_int_columns(df, ["num_prefill_tokens", "num_decode_tokens"], path, 1), source=str(path))


def load_servesim(path: Path) -> Trace:
    df = _read_csv(path, ["arrival_s", "prompt_tokens", "output_tokens"])
    t = pd.to_numeric(df["arrival_s"], errors="coerce")
    if (t.isna() | (t < 0)).any():
        i = int(np.argmax((t.isna() | (t < 0)).to_numpy()))
        cell = _read_csv(path, [], as_text=True)["arrival_s"].iloc[i]
        raise TraceError(f"{path}:{i + 2}: arrival_s {cell!r} is not a number >= 0")
    t = t.to_numpy(dtype=float)
    _check_sorted(t, path, 2)
    return Trace(*_int_columns(df, ["prompt_tokens", "output_tokens"], path, 1), t - t[0], source=str(path))


def load_mooncake(path: Path, block_size: int = 512) -> Trace:
    opener = gzip.open if path.name.endswith(".gz") else open
    ts, inp, out, ids = [], [], [], []
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(io.TextIOWrapper(f, encoding="utf-8"), 1):
                if not raw.strip():
                    continue
                try:
                    r = json.loads(raw)
                    t, i, o, h = r["timestamp"], r["input_length"], r["output_length"], r["hash_ids"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise TraceError(f"{path}:{lineno}: malformed Mooncake record ({type(e).__name__}: {e}); "
                                     "expected timestamp, input_length, output_length, hash_ids") from None
                if not (isinstance(i, int) and i >= 1 and isinstance(o, int) and o >= 1
                        and isinstance(t, (int, float)) and t >= 0 and isinstance(h, list)):
                    raise TraceError(f"{path}:{lineno}: expected timestamp >= 0, input_length >= 1, "
                                     f"output_length >= 1 and a hash_ids list; got {raw.strip()[:120]}")
                ts.append(t)
                inp.append(i)
                out.append(o)
                ids.append(h)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: cannot read: {e}") from None
    if not ts:
        raise TraceError(f"{path}: no records")
    t = np.asarray(ts, dtype=float) / 1000.0
    _check_sorted(t, path, 1)
    return Trace(np.asarray(inp, dtype=np.int64), np.asarray(out, dtype=np.int64), t - t[0], ids, block_size,
                 source=str(path))


def _check_sorted(t: np.ndarray, path: Path, first_line: int) -> None:
    d = np.diff(t)
    if (d < 0).any():
        i = int(np.argmax(d < 0)) + 1
        raise TraceError(f"{path}:{i + first_line}: arrival time goes backwards ({t[i - 1]:g} s then {t[i]:g} s)")


def load_kv_cache_tester(path: Path, conversation_interval_s: float = 60.0) -> Trace:
    """Every conversation file of the folder (sorted by name) at its recorded times, sub-agent requests included
    (at their marker's time plus their own t); conversation c starts at c x conversation_interval_s. Block ids are
    conversation-scoped (conversation x 2**32 + id), as the upstream ids are local to a conversation; the
    session of each request is its conversation's index. Parsing and checks: traces/sessions.py."""
    from .sessions import load_conversations, recorded_requests
    rows = [(t, c, turn) for c, conv in enumerate(load_conversations(path))
            for t, turn in recorded_requests(conv, c * conversation_interval_s)]
    rows.sort(key=lambda r: r[0])                  # stable: ties keep file and walk order
    t = np.array([r[0] for r in rows])
    return Trace(np.array([r[2].prompt for r in rows], dtype=np.int64),
                 np.array([r[2].output for r in rows], dtype=np.int64),
                 t - t[0], [r[2].ids for r in rows], 64, source=str(path), sessions=np.array([r[1] for r in rows]))


def load_trace(path: Path, fmt: str | None = None, conversation_interval_s: float = 60.0) -> Trace:
    fmt = fmt or detect_format(path)
    if fmt == "kv_cache_tester":
        return load_kv_cache_tester(path, conversation_interval_s)
    return {"azure": load_azure, "mooncake": load_mooncake, "lengths": load_lengths, "servesim": load_servesim}[fmt](path)
