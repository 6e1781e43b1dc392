"""bench/gpu_check.py, the prepared GPU check, kept from rotting on machines without a GPU: it runs
to the end with every GPU step skipped and its reason written, every step's command is one its
module accepts, and the runner records passes, failures, time-outs and the budget as it should."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_without_cuda_every_step_is_skipped_with_its_reason(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path / "r")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    names = [s.name for s in gpu_check.steps(sys.executable, tmp_path)]
    assert [r["name"] for r in report["steps"]] == names
    assert all(r["status"] == "skipped" and "no CUDA device" in r["reason"] for r in report["steps"])
    assert "torch" in report["environment"] and "nvcc" in report["environment"]
    md = (tmp_path / "r.md").read_text()
    assert "| sample 512² | skipped |" in md


@pytest.mark.slow  # one interpreter start per step
@pytest.mark.parametrize("step", gpu_check.steps(sys.executable, Path("/tmp/work")), ids=lambda s: s.name)
def test_every_step_command_is_accepted_by_its_module(step):
    argv = step.argv[1:]
    if argv[0] == "setup.py":
        assert (ROOT / "setup.py").is_file() and argv[1:] == ["build_ext", "--inplace"]
        return
    assert argv[0] == "-m"
    if argv[1] == "pytest":
        assert all((ROOT / a).is_file() for a in argv if a.startswith("tests/"))
        return
    helped = subprocess.run([sys.executable, "-m", argv[1], "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0, helped.stderr
    for flag in (a for a in argv[2:] if a.startswith("--")):
        assert re.search(rf"{re.escape(flag)}\b", helped.stdout), f"{argv[1]} has no {flag}"


def test_runner_records_passes_failures_timeouts_and_the_budget(tmp_path, monkeypatch, capsys):
    py = sys.executable
    fake = [
        gpu_check.Step("table", [py, "-c", "print('| a | 2.0× |')"], 30, "", figures=gpu_check.table_lines),
        gpu_check.Step("parity", [py, "-c", "print('1 failed, 3 passed'); raise SystemExit(1)"], 30, "", parity=True,
                       figures=gpu_check.pytest_summary),
        gpu_check.Step("slow", [py, "-c", "import time; print('started', flush=True); time.sleep(60)"], 600, ""),
        gpu_check.Step("after the budget", [py, "-c", "print('never')"], 30, ""),
        gpu_check.Step("needs nvcc", [py, "-c", "print('never')"], 30, "", needs=("nvcc",)),
    ]
    monkeypatch.setattr(gpu_check, "steps", lambda py, work: fake)
    monkeypatch.setattr(gpu_check, "requirements", lambda: {"cuda": None, "nvcc": "no nvcc on PATH"})
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 1)
    code = gpu_check.main(["--out", str(tmp_path / "r"), "--budget-s", "8"])  # "slow" is cut to what is left
    assert code == 1  # the parity step failed
    got = {r["name"]: r for r in json.loads((tmp_path / "r.json").read_text())["steps"]}
    assert got["table"]["status"] == "passed" and got["table"]["figures"] == ["| a | 2.0× |"]
    assert got["parity"]["status"] == "failed" and got["parity"]["figures"] == ["1 failed, 3 passed"]
    assert got["slow"]["status"] == "timed out" and "started" in got["slow"]["tail"]
    assert got["after the budget"]["status"] == "skipped" and "budget" in got["after the budget"]["reason"]
    assert got["needs nvcc"]["status"] == "skipped" and "nvcc" in got["needs nvcc"]["reason"]
    monkeypatch.setattr(gpu_check, "steps", lambda py, work: fake[:1])
    assert gpu_check.main(["--out", str(tmp_path / "r2")]) == 0
