"""Drift checks: `servesim validate ... --record FILE` appends what the validation found (each metric's relative
error, with the engine's version, the machine and the date) to a JSON-lines file; `servesim drift FILE` runs
each recorded validation again and fails when some error has grown by more than a threshold (percentage
points of |rel_err|) since its last record. A new engine version that changes behaviour is then caught,
instead of silently eroding the simulator's accuracy.
"""
from __future__ import annotations

import datetime as dt
import json
import platform
from pathlib import Path

from servesim.sim.errors import ConfigError

KEY = ("config", "set", "backend", "recorded")      # what identifies a validation across records


def record_line(doc: dict, config: Path, overrides: list, backend: str, recorded: Path | None) -> dict:
    """One record: how to run the validation again, and what it found."""
    errs = {name: v["rel_err"] for name, v in doc["metrics"].items()}
    return {"config": str(config), "set": list(overrides), "backend": backend,
            "recorded": str(recorded) if recorded else None,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"processor": platform.processor() or platform.machine(), "system": platform.system(),
                        "python": platform.python_version()},
            "engine": {k: doc[k] for k in ("vllm_version", "torch_version") if k in doc} or
                      {"devices": doc.get("devices")},
            "rel_err": errs}


def append(path: Path, line: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def load(path: Path) -> list[dict]:
    if not Path(path).is_file():
        raise ConfigError(f"drift: no records file {path} (servesim validate ... --record {path} makes one)")
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not a JSON record ({e.msg})") from None
        missing = [k for k in (*KEY, "rel_err") if k not in rec]
        if missing:
            raise ConfigError(f"{path}:{n}: record lacks {', '.join(missing)}")
        out.append(rec)
    if not out:
        raise ConfigError(f"drift: {path} has no records")
    return out


def latest(records: list[dict]) -> list[dict]:
    """The last record of each distinct validation, in first-seen order."""
    last: dict = {}
    for r in records:
        last[tuple(json.dumps(r[k]) for k in KEY)] = r
    return list(last.values())


def compare(old: dict, new_errs: dict, threshold_pct: float) -> list[dict]:
    """Per metric: the recorded and new |rel_err| (in %) and whether it grew past the threshold."""
    rows = []
    for name, e0 in old["rel_err"].items():
        e1 = new_errs.get(name)
        if e0 is None or e1 is None:
            continue
        a0, a1 = 100 * abs(e0), 100 * abs(e1)
        rows.append({"metric": name, "recorded_pct": a0, "now_pct": a1, "growth_pp": a1 - a0,
                     "drifted": a1 - a0 > threshold_pct})
    return rows


def run_validation(rec: dict, out: Path) -> dict:
    from servesim.sim.config import load_config
    cfg, base = load_config(rec["config"], rec["set"])
    if rec["backend"] == "vllm":
        from .validate_vllm import validate_vllm
        return validate_vllm(cfg, base, out, recorded=Path(rec["recorded"]) if rec["recorded"] else None)
    from .validate import validate
    return validate(cfg, base, out)


def drift(path: Path, out: Path, threshold_pct: float = 5.0, update: bool = False) -> list[dict]:
    """Re-run every recorded validation; each result: the record, the per-metric rows, drifted or not."""
    results = []
    for k, rec in enumerate(latest(load(path))):
        doc = run_validation(rec, out / f"check{k}")
        rows = compare(rec, {n: v["rel_err"] for n, v in doc["metrics"].items()}, threshold_pct)
        drifted = any(r["drifted"] for r in rows)
        results.append({"record": rec, "rows": rows, "drifted": drifted})
        if update and not drifted:
            append(path, record_line(doc, Path(rec["config"]), rec["set"], rec["backend"],
                                     Path(rec["recorded"]) if rec["recorded"] else None))
    return results


def format_results(results: list[dict], threshold_pct: float) -> str:
    lines = []
    for res in results:
        rec = res["record"]
        lines.append(f"{rec['config']} ({rec['backend']}, recorded {rec['date']}): "
                     + ("DRIFTED" if res["drifted"] else "ok"))
        for r in res["rows"]:
            flag = f"  > {threshold_pct:g} pp" if r["drifted"] else ""
            lines.append(f"  {r['metric']:22s} |err| {r['recorded_pct']:6.1f}% -> {r['now_pct']:6.1f}% "
                         f"({r['growth_pp']:+.1f} pp){flag}")
    return "\n".join(lines)
