"""How the Triton-interpreter tests run: the cases in one child process, the verdicts in pytest.

Why a child process: the interpreter (TRITON_INTERPRET=1) is chosen when ``@triton.jit`` runs,
i.e. when the kernels are imported, and it is process-wide. Running the cases in their own
interpreter-mode process keeps every other test (torch.compile, a real GPU) free of it, whatever
the import order, so the variable must never be set in the pytest process.

Each pair is a parent, tests/test_<x>_triton.py, and a worker, tests/<x>_interp_worker.py:

    TRITON_INTERPRET=1 python tests/<x>_interp_worker.py [case-substring ...]

runs the cases named exactly, or whose id contains one of the other arguments (all without one), and
prints one JSON object {case_id: "ok" | "FAIL: ..."} on its last line. A worker's ``CASES`` is
importable without torch or triton, so the parent parametrises over it (``load_cases``) and looks
each case up in the worker's output (``run_worker``, once per module and tier): ``parity_tests`` is
both. A few cases may run in the fast tier (``fast``), in a worker of their own; the others are slow.

The workers run as scripts, so tests/ (their directory) is sys.path[0] and ``import interp_harness``
and ``import ops_parity`` work there as they do under pytest. This module imports neither torch
nor triton at top level: the workers import it at theirs, which ``load_cases`` runs in pytest.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install -r requirements.txt)")


def load_cases(worker: Path) -> dict:
    """The worker's CASES, without running it (its top level imports neither torch nor triton)."""
    spec = importlib.util.spec_from_file_location(worker.stem, worker)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.CASES


def run_worker(worker: Path, cases=(), timeout=600) -> dict:
    """The verdicts of one interpreter-mode run of the worker on ``cases`` (ids; all without any);
    every case fails with its stderr's tail if the worker dies."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(worker), *cases], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=worker.parent)
    if proc.returncode != 0:
        died = f"interpreter worker exited {proc.returncode}:\n{proc.stderr[-4000:]}"
        return {case: died for case in cases or load_cases(worker)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Verdicts:
    """A module's verdicts, the worker run once per tier on first need: the ``fast`` cases together,
    the others together (so the fast tier never waits for the slow ones, and the full suite runs
    each case once)."""

    def __init__(self, worker: Path, fast: tuple = ()):
        self.worker, self.cases = worker, sorted(load_cases(worker))
        self.fast = set(fast)
        assert self.fast <= set(self.cases), sorted(self.fast - set(self.cases))
        self.runs: dict[bool, dict] = {}

    def __getitem__(self, case: str) -> str:
        fast = case in self.fast
        if fast not in self.runs:
            self.runs[fast] = run_worker(self.worker, [c for c in self.cases if (c in self.fast) == fast])
        return self.runs[fast].get(case, "missing from the worker's output")


def parity_tests(worker: Path, fast: tuple = ()):
    """(fixture, test) for a parent: bind them as ``interp_results, test_<x>_interpreter_parity``; pytest
    names the tests after that binding, one per case id, each asserting its case's verdict is "ok".
    The fixture is module-scoped so the worker runs once per tier (and, if it dies, fails each of
    that run's cases once); the cases not in ``fast`` are marked slow."""
    @pytest.fixture(scope="module")
    def interp_results():
        return Verdicts(worker, fast)

    # a child process that imports torch and triton and interprets the cases
    cases = [pytest.param(c, marks=() if c in fast else pytest.mark.slow) for c in sorted(load_cases(worker))]

    @needs_triton
    @pytest.mark.parametrize("case", cases)
    def test(interp_results, case):
        result = interp_results[case]
        assert result == "ok", result

    return interp_results, test


def worker_main(argv, cases, run_case, reset=lambda: None):
    """The worker's loop: run_case(cases[id]) for each wanted id ("ok", or it raises), reset() after each
    (a case may set a module-level block override), then print the JSON verdicts."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    import torch
    torch.set_num_threads(1)
    wanted = [c for c in cases if not argv or c in argv or any(a not in cases and a in c for a in argv)]
    out = {}
    for cid in wanted:
        try:
            out[cid] = run_case(cases[cid])
        except Exception as e:  # report, keep going: the parent shows each case on its own
            out[cid] = f"FAIL: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
        finally:
            reset()
    print(json.dumps(out))


def expect_error(call, exc, msg):
    """"ok" when ``call()`` raises ``exc`` with ``msg`` in its text; AssertionError saying what happened otherwise."""
    try:
        call()
    except exc as e:
        if msg not in str(e):
            raise AssertionError(f"{exc.__name__} without {msg!r}: {e}") from None
        return "ok"
    raise AssertionError(f"no {exc.__name__} ({msg!r})")


def expect_errors(checks, exc=ValueError):
    """expect_error for each (call, msg) of ``checks``, the failing one named by its index."""
    for i, (call, msg) in enumerate(checks):
        try:
            expect_error(call, exc, msg)
        except AssertionError as e:
            raise AssertionError(f"check {i}: {e}") from None
    return "ok"


def close(name, got, ref, rtol=1e-5):
    """ops_parity.close with the name first (how the workers call it); imported late, as it imports torch."""
    from ops_parity import close as _close
    _close(got, ref, rtol, name)
