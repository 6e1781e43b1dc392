"""The GPU check: one prepared script for the day a GPU is lent (``make gpu-check``).

In at most ``--budget-s`` (480 s by default; a lent machine allows 10 minutes a command) it:

1. writes down the device and the versions (torch, CUDA, cuDNN, triton, nvcc, TensorRT, ONNX Runtime,
   OpenVINO) and which of the project's Python dependencies are missing;
2. builds the extension in place with the machine's own torch (the CUDA kernels when nvcc is found);
3. runs the cuda and triton op and block parity tests on the device (tests/test_ops_gpu.py);
4. times the fused ops and blocks against eager cuDNN and torch.compile (bench.bench_ops_gpu,
   bench.bench_blocks);
5. trains a few hundred steps of each stage in bf16 on the GPU, then again with ``--compile on``;
6. samples 512² with eager, torch.compile and TensorRT where importable (bench.bench_sampling).

Each step runs as a subprocess with its own time limit cut to what is left of the budget; a step
whose requirement is missing (no CUDA device, no pytest, no nvcc, …) is skipped with the reason, and
one that fails or runs out of time is recorded with its output's tail, and the next step runs. The
report, ``bench/results/gpu-check-<date>-<host>.md`` and ``.json`` (device, versions, every figure,
every skip and its reason), is rewritten after every step, so a check cut short still leaves one.
Exit status: 0, or 1 when a parity step failed (a missing optional part never fails the check).

The machine it is written for has CUDA 13, its own torch and triton, no network and no pip:
everything is feature-detected, nothing is installed, no version string is matched.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
DEPENDENCIES = ("numpy", "PIL", "tqdm", "scipy", "matplotlib", "pytest", "triton", "onnx", "onnxruntime",
                "openvino", "tensorrt", "efficientnet_lite_pytorch")
# The modules aegan_fast cannot import without: a step that runs the package needs them.
PACKAGE_NEEDS = ("numpy", "PIL", "tqdm")
MIN_STEP_S = 20  # a step is not started with less of the budget left


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: float
    why: str                                   # what the step shows, for the report
    needs: tuple[str, ...] = ()                # keys of requirements(): each must be None (available)
    parity: bool = False                       # a failure here fails the check
    figures: Callable[[str], list[str]] | None = None


@dataclass
class Result:
    name: str
    status: str                                # passed | failed | timed out | skipped
    seconds: float = 0.0
    reason: str = ""
    command: str = ""
    figures: list[str] = field(default_factory=list)
    tail: str = ""
    parity: bool = False


def table_lines(out: str) -> list[str]:
    """The rows of the harness's tables (bench/timing.py): lines with a '|' or a ratio."""
    return [ln.rstrip() for ln in out.splitlines() if "|" in ln or re.search(r"\d+(\.\d+)?×", ln)][:80]


def pytest_summary(out: str) -> list[str]:
    return [ln.strip() for ln in out.splitlines() if re.search(r"\d+ (passed|failed|skipped)", ln)][-1:]


def steps(py: str, work: Path) -> list[Step]:
    """The check, in order (commands run from the repository root)."""
    train = [py, "-m", "aegan_fast.train", "--device", "cuda", "--precision", "bf16", "--no-progress",
             "--kimg", "ae=6.4", "embed=6.4", "finetune=3.2", "--sample-every-kimg", "0", "--eval-n", "0"]
    return [
        Step("build the extension", [py, "setup.py", "build_ext", "--inplace"], 240,
             "aegan_fast._C with the CUDA kernels, built by this machine's torch and nvcc", needs=("cuda", "nvcc")),
        Step("op and block parity on the device", [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                                    "tests/test_ops_gpu.py"], 150,
             "cuda and triton kernels against cuDNN/stock torch on fresh inputs, odd shapes, every gradient",
             needs=("cuda", "pytest", "package"), parity=True, figures=pytest_summary),
        Step("fused ops vs eager cuDNN", [py, "-m", "bench.bench_ops_gpu", "--rounds", "7"], 90,
             "bn_act / bn_add_act forward+backward, fp32 and bf16", needs=("cuda", "package"), figures=table_lines),
        Step("fused blocks vs eager and torch.compile", [py, "-m", "bench.bench_blocks"], 150,
             "resblock and up block, 128² and 256², fp32 and bf16", needs=("cuda", "package", "triton"),
             figures=table_lines),
        Step("train each stage, bf16", train + ["--run-dir", str(work / "run-bf16")], 150,
             "200 + 200 + 100 steps of the demo preset on the GPU", needs=("cuda", "package"),
             figures=lambda out, run=work / "run-bf16": stage_rates(run)),
        Step("train each stage, bf16 + compile", train + ["--compile", "on", "--run-dir", str(work / "run-compile")], 180,
             "the same with torch.compile (compile time included in the first steps)", needs=("cuda", "package"),
             figures=lambda out, run=work / "run-compile": stage_rates(run)),
        Step("sample 512²", [py, "-m", "bench.bench_sampling", "--resolution", "512", "--batches", "1", "8",
                             "--rounds", "3", "--device", "cuda", "--backends", "eager,compile,tensorrt"], 150,
             "eager, torch.compile and TensorRT (where importable) at batch 1 and 8", needs=("cuda", "package"),
             figures=table_lines),
    ]


def stage_rates(run: Path) -> list[str]:
    """Each stage's img/s as the trainer logged it (metrics.jsonl)."""
    out = []
    path = run / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "img_per_s" in row and row.get("step", 0) % 50 == 0:
            out.append(f"{row.get('stage')} step {row.get('step')}: {row['img_per_s']:.1f} img/s")
    return out


def requirements() -> dict[str, str | None]:
    """{requirement: None when met, else why not}."""
    have = {m: importlib.util.find_spec(m) is not None for m in DEPENDENCIES + ("torch",)}
    out: dict[str, str | None] = {}
    cuda = "torch is not importable"
    if have["torch"]:
        import torch
        cuda = None if torch.cuda.is_available() else "no CUDA device (torch.cuda.is_available() is False)"
    out["cuda"] = cuda
    out["nvcc"] = None if (shutil.which("nvcc") or os.environ.get("CUDA_HOME")) else "no nvcc on PATH and no CUDA_HOME"
    out["pytest"] = None if have["pytest"] else "pytest is not installed"
    out["triton"] = None if have["triton"] else "triton is not installed"
    missing = [m for m in PACKAGE_NEEDS if not have[m]]
    out["package"] = f"aegan_fast needs {', '.join(missing)}, not installed" if missing else None
    return out


def environment() -> dict:
    env = {"host": platform.node(), "python": platform.python_version(), "machine": platform.machine(),
           "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import torch
        env["torch"] = torch.__version__
        env["cuda (torch built with)"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env["device"] = f"{p.name}, {p.total_memory / 2 ** 30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs"
            env["cudnn"] = str(torch.backends.cudnn.version())
            env["bf16 supported"] = str(torch.cuda.is_bf16_supported())
    except Exception as e:  # a broken torch is a finding, not a crash
        env["torch"] = f"not importable: {type(e).__name__}: {e}"
    for mod in ("triton", "tensorrt", "onnxruntime", "openvino"):
        if importlib.util.find_spec(mod) is None:
            env[mod] = "not installed"
            continue
        try:
            env[mod] = getattr(__import__(mod), "__version__", "installed")
        except Exception as e:
            env[mod] = f"not importable: {type(e).__name__}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
            env["nvcc"] = out.strip().splitlines()[-1] if out.strip() else "present"
        except Exception as e:
            env["nvcc"] = f"present, no version: {type(e).__name__}"
    else:
        env["nvcc"] = "not on PATH"
    env["missing Python modules"] = ", ".join(m for m in DEPENDENCIES if importlib.util.find_spec(m) is None) or "none"
    return env


def run_step(step: Step, timeout_s: float, env: dict) -> Result:
    started = time.perf_counter()
    command = " ".join(step.argv)
    try:
        proc = subprocess.run(step.argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return Result(step.name, "timed out", time.perf_counter() - started, f"over its {timeout_s:.0f} s", command,
                      step.figures(out) if step.figures else [], out[-3000:])
    except OSError as e:
        return Result(step.name, "failed", time.perf_counter() - started, f"cannot start: {e}", command)
    out = proc.stdout + proc.stderr
    status = "passed" if proc.returncode == 0 else "failed"
    reason = "" if status == "passed" else f"exit status {proc.returncode}"
    figures = step.figures(out) if step.figures else []
    return Result(step.name, status, time.perf_counter() - started, reason, command, figures, out[-3000:])


def write_report(out: Path, env: dict, results: list[Result], budget_s: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "budget_s": budget_s,
                                                    "steps": [asdict(r) for r in results]}, indent=2) + "\n")
    lines = ["# GPU check", "", f"Written by `make gpu-check` (bench/gpu_check.py), budget {budget_s:.0f} s.", "",
             "| what | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", "| step | status | seconds | reason |", "|---|---|---:|---|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.reason} |" for r in results]
    for r in results:
        if r.figures or r.status in ("failed", "timed out"):
            lines += ["", f"## {r.name}", "", f"`{r.command}`", ""]
            if r.figures:
                lines += ["```", *r.figures, "```"]
            if r.status in ("failed", "timed out"):
                lines += ["Output, last lines:", "```", *r.tail.splitlines()[-25:], "```"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=480, help="the whole check's time limit (default 480)")
    p.add_argument("--out", help="report path without suffix (default bench/results/gpu-check-<date>-<host>)")
    p.add_argument("--only", nargs="+", help="run only the steps whose name contains one of these words")
    args = p.parse_args(argv)
    started = time.perf_counter()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu-check-{stamp}-{platform.node()}"
    env = environment()
    have = requirements()
    child_env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        for step in steps(sys.executable, Path(work)):
            if args.only and not any(w in step.name for w in args.only):
                continue
            left = args.budget_s - (time.perf_counter() - started)
            missing = [f"{need}: {have[need]}" for need in step.needs if have.get(need)]
            if missing:
                result = Result(step.name, "skipped", reason="; ".join(missing), command=" ".join(step.argv))
            elif left < MIN_STEP_S:
                result = Result(step.name, "skipped", reason=f"the budget is spent ({left:.0f} s left)",
                                command=" ".join(step.argv))
            else:
                print(f"gpu-check: {step.name} (up to {min(step.timeout_s, left):.0f} s)", flush=True)
                result = run_step(step, min(step.timeout_s, left), child_env)
                result.parity = step.parity
            results.append(result)
            print(f"gpu-check: {step.name}: {result.status}{' — ' + result.reason if result.reason else ''}", flush=True)
            write_report(out, env, results, args.budget_s)
    print(f"gpu-check: wrote {out}.md and .json in {time.perf_counter() - started:.0f} s")
    return 1 if any(r.parity and r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
