"""Bad input gets one clear message naming what and where, exit code 2, and no traceback."""
import subprocess
import sys
import textwrap

import pytest

GOOD = """
name: t
fleet:
  replicas:
    - gpu: H100-SXM
      model: meta-llama/Llama-3.1-8B
workload:
  kind: synthetic
  num_requests: 20
  arrival: {process: poisson, rate: 5}
  lengths: {kind: independent, input: {dist: fixed, value: 100}, output: {dist: fixed, value: 10}}
output: {plots: false}
"""


def servesim(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "servesim.sim.cli", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)


def run_cfg(tmp_path, text, *extra):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(text))
    return servesim(tmp_path, "run", str(p), "-o", str(tmp_path / "out"), "--quiet", *extra)


def assert_clean_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_good_config_runs(tmp_path):
    r = run_cfg(tmp_path, GOOD)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "report.json").is_file()


def test_unknown_key(tmp_path):
    r = run_cfg(tmp_path, GOOD.replace("model:", "modle:"))
    assert_clean_error(r, "fleet.replicas[0].modle: unknown key", "allowed here:", "fleet.replicas[0].model: required")


def test_wrong_type(tmp_path):
    r = run_cfg(tmp_path, GOOD.replace("num_requests: 20", "num_requests: lots"))
    assert_clean_error(r, "workload.num_requests", "valid integer", "'lots'")


def test_negative_rate(tmp_path):
    r = run_cfg(tmp_path, GOOD.replace("rate: 5", "rate: -2"))
    assert_clean_error(r, "workload.arrival.rate: Input should be greater than 0", "-2")


def test_set_override_is_validated_too(tmp_path):
    r = run_cfg(tmp_path, GOOD, "--set", "fleet.replicas.0.engine.gpu_memory_utilization=1.5")
    assert_clean_error(r, "fleet.replicas[0].engine.gpu_memory_utilization", "less than or equal to 1")


def test_missing_trace_file(tmp_path):
    cfg = GOOD.split("workload:")[0] + "workload:\n  kind: trace\n  path: nowhere/trace.csv\noutput: {plots: false}\n"
    r = run_cfg(tmp_path, cfg)
    assert_clean_error(r, "trace file not found: nowhere/trace.csv")


def test_malformed_trace_line_names_file_and_line(tmp_path):
    (tmp_path / "bad.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                      "2023-11-16 18:15:46.6805900,374,44\n"
                                      "2023-11-16 18:15:50.9951690,abc,109\n")
    cfg = GOOD.split("workload:")[0] + "workload:\n  kind: trace\n  path: bad.csv\noutput: {plots: false}\n"
    r = run_cfg(tmp_path, cfg)
    assert_clean_error(r, "bad.csv:3: column ContextTokens is 'abc'")


def test_malformed_mooncake_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n'
                                      '{"timestamp": 5, "input_length": 10\n')
    cfg = GOOD.split("workload:")[0] + "workload:\n  kind: trace\n  path: m.jsonl\noutput: {plots: false}\n"
    assert_clean_error(run_cfg(tmp_path, cfg), "m.jsonl:2: malformed Mooncake record")


def test_model_too_large_for_its_gpus(tmp_path):
    r = run_cfg(tmp_path, GOOD.replace("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-405B"))
    assert_clean_error(r, "fleet.replicas[0]", "does not fit on 1 x H100-SXM", "weights 755.", "GiB")


def test_unknown_gpu_suggests_names(tmp_path):
    r = run_cfg(tmp_path, GOOD.replace("H100-SXM", "H100-SMX"))
    assert_clean_error(r, "fleet.replicas[0].gpu: unknown gpu 'H100-SMX'", "did you mean")


def test_request_longer_than_context_window_is_rejected_and_counted(tmp_path):
    cfg = GOOD.replace("model: meta-llama/Llama-3.1-8B",
                       "model: meta-llama/Llama-3.1-8B\n      engine: {max_model_len: 105}")
    r = run_cfg(tmp_path, cfg)
    assert r.returncode == 0, r.stderr
    import json
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["requests"]["rejected"] == 20
    assert rep["requests"]["rejected_by_reason"] == {"exceeds_max_model_len": 20}
    assert rep["slo"]["attainment"] == 0.0


def test_missing_config_file(tmp_path):
    assert_clean_error(servesim(tmp_path, "run", "nope.yaml"), "config file not found: nope.yaml")


def test_not_yaml(tmp_path):
    assert_clean_error(run_cfg(tmp_path, "fleet: [unclosed\n"), "not valid YAML")


def test_run_prints_the_summary_markdown_itself_when_piped(tmp_path):
    """Not a terminal: stdout gets summary.md as written (for scripts and files), then where the outputs went."""
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(GOOD))
    r = servesim(tmp_path, "run", str(p), "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "out" / "summary.md").read_text()
    assert md.startswith("# servesim report: t\n")
    assert r.stdout.startswith(md) and r.stdout[len(md):].lstrip().startswith(f"wrote {tmp_path / 'out'}/")
