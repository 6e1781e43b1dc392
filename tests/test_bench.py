"""The benchmark suite runs end to end: ``python -m bench --quick`` (the issue's smoke test) prints its
table and writes a JSON with every section's rows measured; a failing row is reported and fails the
run without stopping the other rows."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import suite  # noqa: E402

SECTIONS = ("peaks", "ops", "loaders", "steps", "sampling", "blocks")


def test_sections_are_the_issue_list():
    assert tuple(suite.SECTIONS) == SECTIONS


def test_quick_suite_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())
    assert report["quick"] and report["sections"] == list(SECTIONS)
    feats = report["features"]
    assert feats["torch"] and feats["cpu_capability"] and feats["cores"] >= 1
    assert isinstance(feats["mkldnn_bf16_supported"], bool)
    for key in ("copy", "matmul_fp32", "matmul_bf16", "conv_fp32", "conv_bf16_cl"):
        assert math.isfinite(report["peaks"][key]) and report["peaks"][key] > 0, key
    rows = report["rows"]
    assert not [r for r in rows if r["status"] == "error"]
    for section in SECTIONS:
        ok = [r for r in rows if r["section"] == section and r["status"] == "ok"]
        if section == "loaders" and not ok:  # no emoji set on this machine: the suite says why
            assert [r for r in rows if r["section"] == section and r["status"] == "skipped" and r["note"]]
            continue
        if section == "blocks" and not torch.cuda.is_available():  # GPU-only: skipped, saying why
            assert [r for r in rows if r["section"] == section and r["status"] == "skipped"
                    and "CUDA GPU" in r["note"]]
            continue
        assert ok, f"section {section} measured nothing"
        for r in ok:
            assert len(r["samples_s"]) >= 2 and all(t > 0 for t in r["samples_s"]), r["name"]
            assert math.isfinite(r["median_s"]) and math.isfinite(r["rate"]) and r["rate"] > 0, r["name"]
            assert all(math.isfinite(v) and v > 0 for v in r["ratios"].values()), r["name"]
            assert all(math.isfinite(v) and v > 0 for v in r["peak_fraction"].values()), r["name"]
            if r["unit"] in ("FLOP", "B"):
                assert r["peak_fraction"], r["name"]
        # every non-baseline row of a section is compared with a baseline measured in the same run
        if section != "peaks":
            assert any(r["ratios"] for r in ok), section
    steps = {r["name"]: r for r in rows if r["section"] == "steps"}
    for stage in ("ae", "embed", "finetune"):
        assert f"{stage} R=64 reference" in steps[f"{stage} R=64 fast"]["ratios"]
    sampling = [r["name"] for r in rows if r["section"] == "sampling" and r["status"] == "ok"]
    assert any(n.endswith("b8 eager") for n in sampling) and any(n.endswith("b1 eager") for n in sampling)
    assert "| section | row | median |" in proc.stdout
    for r in rows:
        assert f"| {r['section']} | {r['name']} |" in proc.stdout


def test_failing_row_is_reported_and_the_suite_goes_on(tmp_path, monkeypatch, capsys):
    def fake_peaks(ctx):
        ctx.peaks.update(copy=1e9, matmul_fp32=1e9, matmul_bf16=2e9)
        return suite.measure("peaks", [suite.Case("tiny", lambda: sum(range(100)), 1e3, "FLOP")], 2)

    def broken(ctx):
        def boom():
            raise RuntimeError("kernel exploded")
        return suite.measure("ops", [suite.Case("base", lambda: None, 1.0, "img"),
                                     suite.Case("bad", boom, 1.0, "img", ("base",)),
                                     suite.Case("good", lambda: None, 1.0, "img", ("base",))], 3)

    def raises(ctx):
        raise ImportError("no such backend")

    monkeypatch.setattr(suite, "SECTIONS", {"peaks": fake_peaks, "ops": broken, "steps": raises})
    out = tmp_path / "r.json"
    assert suite.run(["ops", "steps"], True, out, ["--quick"]) == 1
    printed = capsys.readouterr().out
    assert "| ops | bad | ERROR |" in printed and "kernel exploded" in printed
    assert "| steps | (section) | ERROR |" in printed and "no such backend" in printed
    rows = {(r["section"], r["name"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[("ops", "bad")]["status"] == "error" and not rows[("ops", "bad")]["ratios"]
    assert rows[("ops", "good")]["status"] == "ok" and len(rows[("ops", "good")]["samples_s"]) == 3
    assert math.isfinite(rows[("ops", "good")]["ratios"]["base"])
    assert rows[("peaks", "tiny")]["peak_fraction"]["matmul_fp32"] > 0


def test_cli_rejects_unknown_section():
    from bench.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["--only", "nosuch"])
    assert e.value.code == 2


def test_blocks_bench_skips_without_cuda(capsys):
    """bench_blocks.py is GPU-only: without CUDA one clear line, exit 0, and a skipped suite row."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: bench_blocks.py measures (run it by hand, it takes minutes)")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_blocks.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == ["bench_blocks: skipped: needs a CUDA GPU (torch sees none)"]
    rows = suite.SECTIONS["blocks"](suite.Context(quick=True))
    assert [(r.section, r.status) for r in rows] == [("blocks", "skipped")]
    assert "needs a CUDA GPU" in rows[0].note
