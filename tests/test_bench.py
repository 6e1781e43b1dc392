"""The benchmark harness and suite: bench/timing.py interleaves rounds and summarises them as it says;
``python -m bench --quick`` (the issue's smoke test) prints its table and writes a JSON with every
section's rows measured; a failing row is reported and fails the run without stopping the other rows."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import suite, timing

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("peaks", "ops", "loaders", "steps", "sampling", "blocks")


class FakeClock:
    """time.perf_counter for bench/timing.py: advanced only by the cases' calls."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_measure_interleaves_rounds_and_summarises(monkeypatch):
    clock, calls = FakeClock(), []
    monkeypatch.setattr(timing.time, "perf_counter", clock)

    def case(name, durations):
        it = iter(durations)

        def fn():
            calls.append(name)
            clock.now += next(it)
        return fn

    rows = timing.measure("s", [timing.Case("base", case("base", [9.0, 4.0, 4.0, 4.0]), 8.0, "img"),
                                timing.Case("new", case("new", [9.0, 3.0, 1.0, 2.0]), 8.0, "img", ("base",))], 3)
    # one warm-up each, then the rounds alternate: load from other processes falls on both alike
    assert calls == ["base", "new"] * 4
    base, new = rows
    assert new.samples_s == [3.0, 1.0, 2.0] and base.samples_s == [4.0, 4.0, 4.0]  # the warm-up is not a sample
    assert (new.median_s, new.best_s, new.worst_s, new.rate) == (2.0, 1.0, 3.0, 4.0)
    assert new.ratios == {"base": 2.0} and base.ratios == {}


def test_a_sample_is_the_mean_over_repeats_and_a_window_after_the_drain(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    n = [0]

    def fn():  # the k-th call takes k seconds
        n[0] += 1
        clock.now += n[0]

    (row,) = timing.measure("s", [timing.Case("r", fn, 1.0, "img", repeat=2, drain=1, warmed=True)], 1)
    assert n[0] == 3 and row.samples_s == [(2 + 3) / 2]  # call 1 drained, calls 2 and 3 timed
    n[0], clock.now = 0, 0.0
    (row,) = timing.measure("s", [timing.Case("w", fn, 1.0, "img", min_sample_s=5.5, warmed=True)], 1)
    assert n[0] == 3 and row.samples_s == [(1 + 2 + 3) / 3]  # until the sample lasts 5.5 s


def test_a_cuda_case_is_synchronised_around_each_sample_not_each_call(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    timing.measure("s", [timing.Case("g", lambda: events.append("call"), 1.0, "B", device="cuda", repeat=3)], 2)
    sample = ["sync", "call", "call", "call", "sync"]
    assert events == sample * 3  # the warm-up is a sample too, not kept
    events.clear()
    timing.measure("s", [timing.Case("c", lambda: events.append("call"), 1.0, "B", repeat=3)], 1)
    assert events == ["call"] * 6


def test_peak_fractions_are_of_the_named_peaks():
    rows = [timing.Row("s", "a", "ok", unit="B", rate=5.0, peaks=("copy",)),
            timing.Row("s", "b", "ok", unit="FLOP", rate=3.0, peaks=("matmul_fp32", "matmul_bf16", "absent")),
            timing.Row("s", "c", "error", unit="B", peaks=("copy",))]
    timing.fill_peak_fractions(rows, {"copy": 10.0, "matmul_fp32": 6.0, "matmul_bf16": 12.0})
    assert [r.peak_fraction for r in rows] == [{"copy": 0.5}, {"matmul_fp32": 0.5, "matmul_bf16": 0.25}, {}]


def test_only_runs_the_chosen_sections_between_two_peak_measurements(tmp_path, monkeypatch):
    ran = []

    def section(name):
        def run(ctx):
            ran.append(name)
            return [timing.Row(name, name, "ok")]
        return run

    monkeypatch.setattr(suite, "SECTIONS", {s: section(s) for s in SECTIONS})
    assert suite.run(["steps", "ops"], True, tmp_path / "r.json", []) == 0
    # in the suite's order, not the command line's; the peaks again at the end, load having moved on
    assert ran == ["peaks", "ops", "steps", "peaks"]
    assert json.loads((tmp_path / "r.json").read_text())["sections"] == ["peaks", "ops", "steps"]


@pytest.mark.bench
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
        assert {f"{stage} R=64 reference", f"{stage} R=64 autocast"} <= set(steps[f"{stage} R=64 fast"]["ratios"])
    sampling = [r["name"] for r in rows if r["section"] == "sampling" and r["status"] == "ok"]
    assert any(n.endswith("b8 eager") for n in sampling) and any(n.endswith("b1 eager") for n in sampling)
    assert "| section | row | median |" in proc.stdout
    for r in rows:
        assert f"| {r['section']} | {r['name']} |" in proc.stdout


def test_failing_row_is_reported_and_the_suite_goes_on(tmp_path, monkeypatch, capsys):
    def fake_peaks(ctx):
        ctx.peaks.update(copy=1e9, matmul_fp32=1e9, matmul_bf16=2e9)
        return timing.measure("peaks", [timing.Case("tiny", lambda: sum(range(100)), 1e3, "FLOP")], 2)

    def broken(ctx):
        def boom():
            raise RuntimeError("kernel exploded")
        return timing.measure("ops", [timing.Case("base", lambda: None, 1.0, "img"),
                                      timing.Case("bad", boom, 1.0, "img", ("base",)),
                                      timing.Case("good", lambda: None, 1.0, "img", ("base",))], 3)

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
    """bench_blocks is GPU-only: without CUDA one clear line, exit 0, and a skipped suite row."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: bench_blocks.py measures (run it by hand, it takes minutes)")
    proc = subprocess.run([sys.executable, "-m", "bench.bench_blocks"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == ["bench_blocks: skipped: needs a CUDA GPU (torch sees none)"]
    rows = suite.SECTIONS["blocks"](timing.Context(quick=True))
    assert [(r.section, r.status) for r in rows] == [("blocks", "skipped")]
    assert "needs a CUDA GPU" in rows[0].note


def test_the_autocast_baseline_is_the_plain_port_under_one_autocast():
    """bench_train_step's ``autocast`` variant is what a user would try first: the plain port (reference
    ops, plain Adam, fp32 master weights) in channels_last under torch.autocast(bf16), so its convs
    compute in bf16 from fp32 activations; the ``reference`` variant's convs stay fp32."""
    from torch import nn
    from bench import bench_train_step as bts

    def conv_dtypes(variant):
        step = bts.make_step("ae", 64, variant, batch=2)
        st, seen = step.state, []
        conv = next(m for m in st.nets["H"].modules() if isinstance(m, nn.Conv2d))
        handle = conv.register_forward_hook(lambda m, inputs, out: seen.append((inputs[0].dtype, out.dtype)))
        step()
        handle.remove()
        assert conv.weight.dtype == torch.float32
        assert not any(opt.defaults.get("fused") for opt in st.opts.values())
        return seen, conv.weight.is_contiguous(memory_format=torch.channels_last)

    seen, channels_last = conv_dtypes("autocast")
    assert seen == [(torch.float32, torch.bfloat16)] and channels_last
    seen, channels_last = conv_dtypes("reference")
    assert seen == [(torch.float32, torch.float32)] and not channels_last


def test_the_fast_step_is_compared_with_both_plain_baselines():
    from bench import bench_train_step as bts
    rows = bts.step_rows("steps", "ae", 64, bts.DEFAULT_VARIANTS, rounds=1, batch=2)
    ratios = {row.name: set(row.ratios) for row in rows}
    assert ratios == {"ae R=64 reference": set(), "ae R=64 autocast": {"ae R=64 reference"},
                      "ae R=64 fast": {"ae R=64 reference", "ae R=64 autocast"}}
    assert all(row.status == "ok" and row.median_s > 0 for row in rows)


def test_the_demo_shape_is_what_make_train_runs():
    """--resolutions demo: the demo preset's nets, batch and embed_steps (resize-conv, no φ), named
    "demo" in the rows; the R=64 shape is not the demo."""
    from aegan_fast.config import preset
    from bench import bench_train_step as bts
    demo = preset("demo")
    st = bts.make_step("embed", "demo", "fast").state
    assert st.cfg.model == demo.model and st.cfg.batch == demo.batch and st.cfg.embed_steps == demo.embed_steps
    assert bts.make_step("ae", 64, "fast", batch=2).state.cfg.model != demo.model
    rows = bts.step_rows("steps", "ae", "demo", ["fast"], rounds=1, batch=2)
    assert [row.name for row in rows] == ["ae demo fast"] and rows[0].status == "ok"


@pytest.mark.slow
def test_the_distributed_ceiling_runs_one_and_two_processes_and_reports_each_mode():
    """bench_distributed --ceiling: one process, then torchrun with two, each timing its modes."""
    proc = subprocess.run([sys.executable, "-m", "bench.bench_distributed", "--ceiling", "--stage", "ae", "--rounds", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-4].startswith("ae step, demo nets, global batch 32")
    assert lines[-3].lstrip().startswith("1 process ×")
    assert "gradients averaged" in lines[-2] and "no all-reduce (the ceiling)" in lines[-1]
    assert lines[-3].rstrip().endswith("1.00×")
