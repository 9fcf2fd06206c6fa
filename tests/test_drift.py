"""Drift checks (experiments/drift.py): a recorded validation re-run unchanged passes; the same validation after
an injected step-time change in the real engine fails, naming what drifted; bad records files are errors."""
import gzip
import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from servesim.sim.cli import app

ROOT = Path(__file__).parent.parent
CONFIG = ROOT / "experiments" / "configs" / "validate_vllm_cpu.yaml"
RECORDED = ROOT / "tests" / "goldens" / "vllm_e2e" / "validate_vllm_cpu.real.json.gz"


def _slower(src: Path, dst: Path, factor: float) -> None:
    """The same replay on an engine whose requests take `factor` x longer from arrival (calibration unchanged)."""
    doc = json.loads(gzip.decompress(src.read_bytes()))
    for r in doc["requests"]:
        r["token_times_s"] = [r["arrival_s"] + (t - r["arrival_s"]) * factor for t in r["token_times_s"]]
    dst.write_text(json.dumps(doc))


def test_drift_passes_unchanged_and_fails_on_a_step_time_change(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVESIM_PROFILES", str(tmp_path / "profiles"))
    replay, records = tmp_path / "real.json.gz", tmp_path / "records.jsonl"
    shutil.copy(RECORDED, replay)
    run = CliRunner().invoke(app, ["validate", str(CONFIG), "--backend", "vllm", "--recorded", str(replay),
                                   "-o", str(tmp_path / "v"), "--record", str(records)])
    assert run.exit_code == 0, run.output
    rec = json.loads(records.read_text())
    assert rec["engine"]["vllm_version"] == "0.32.0" and rec["backend"] == "vllm" and rec["date"]
    assert set(rec["rel_err"]) >= {"ttft_p50", "tpot_p99", "output_tokens_per_s"}

    same = CliRunner().invoke(app, ["drift", str(records), "-o", str(tmp_path / "d1"), "--update"])
    assert same.exit_code == 0, same.output
    assert "ok" in same.output and "DRIFTED" not in same.output
    assert len(records.read_text().splitlines()) == 2            # --update appended the passing result

    _slower(RECORDED, replay, 1.3)                               # the "new engine": 30% slower under this load
    changed = CliRunner().invoke(app, ["drift", str(records), "-o", str(tmp_path / "d2"), "--update"])
    assert changed.exit_code == 1, changed.output
    assert "DRIFTED" in changed.output and "e2e_p50" in changed.output
    assert len(records.read_text().splitlines()) == 2            # a drifted result is not recorded


def test_bad_records(tmp_path):
    out = CliRunner().invoke(app, ["drift", str(tmp_path / "none.jsonl")])
    assert out.exit_code == 2 and "no records file" in out.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"config": "x.yaml"}\n')
    out = CliRunner().invoke(app, ["drift", str(bad)])
    assert out.exit_code == 2 and "bad.jsonl:1: record lacks set, backend, recorded, rel_err" in out.output
    bad.write_text("not json\n")
    out = CliRunner().invoke(app, ["drift", str(bad)])
    assert out.exit_code == 2 and "bad.jsonl:1: not a JSON record" in out.output
