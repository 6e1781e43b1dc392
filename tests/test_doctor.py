"""The doctor reports what really loads here: each op backend as ``ops.availability()`` has it, and a
backend that cannot load as unavailable with its reason, not a blanket "yes"."""
from __future__ import annotations

import subprocess
import sys

import pytest

from aegan_fast import doctor, ops


def _section(out: str, title: str) -> list[str]:
    lines = out.splitlines()
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return lines[start:end]


def _row(rows: list[str], name: str) -> tuple[bool, str]:
    """(marked available, the rest of the line) of the row called name."""
    for line in rows:
        mark, rest = line[2:5], line[6:]
        if rest == name or rest.startswith(name + " "):
            assert mark in (doctor.OK, doctor.NO), line
            return mark == doctor.OK, rest[len(name):].strip()
    raise AssertionError(f"no row {name!r} in {rows}")


def _op_backends(capsys) -> list[str]:
    doctor.main([])
    return _section(capsys.readouterr().out, "op backends")


def test_each_backend_reported_as_availability_has_it(capsys, monkeypatch):
    monkeypatch.delenv("AEGAN_OPS", raising=False)
    rows = _op_backends(capsys)
    available = ops.availability()
    assert set(available) == set(ops.BACKENDS)
    for name, reason in available.items():
        ok, detail = _row(rows, name)
        assert ok == (reason is None), (name, reason, rows)
        assert detail == ("available" if reason is None else reason)
    assert _row(rows, "reference") == (True, "available")   # the fallback every install has
    assert _row(rows, "requested")[0]                       # auto can always run


def test_an_unavailable_backend_shows_as_unavailable_with_its_reason(capsys, monkeypatch):
    real = ops.availability()
    why = "made unavailable by this test"
    monkeypatch.setattr(ops, "availability", lambda: {**real, "cpp": why})
    monkeypatch.setenv("AEGAN_OPS", "cpp")
    rows = _op_backends(capsys)
    assert _row(rows, "cpp") == (False, why)
    assert _row(rows, "reference") == (True, "available")
    ok, detail = _row(rows, "requested")                    # asking for it is flagged too
    assert not ok and detail == f"AEGAN_OPS=cpp: {why}"

    monkeypatch.setenv("AEGAN_OPS", "nonesuch")
    ok, detail = _row(_op_backends(capsys), "requested")
    assert not ok and "unknown backend" in detail


def test_a_section_that_cannot_load_is_reported_not_raised(capsys, monkeypatch):
    def broken(torch):
        raise ImportError("simulated broken exporter")
    monkeypatch.setattr(doctor, "sampler_rows", broken)
    doctor.main([])
    out = capsys.readouterr().out
    assert _row(_section(out, "sampler backends"), "(this section)") == (False, "ImportError: simulated broken exporter")
    assert _section(out, "op backends")                     # the rest is still there


def test_help_and_bad_flags():
    r = subprocess.run([sys.executable, "-m", "aegan_fast.doctor", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: python -m aegan_fast.doctor" in r.stdout and "op backends" in r.stdout
    with pytest.raises(SystemExit) as e:
        doctor.main(["--no-such-flag"])
    assert e.value.code == 2


def test_openvino_and_auto_rows_follow_the_sampler(capsys, monkeypatch):
    import aegan_fast.sampling as sampling
    from aegan_fast.export import openvino_export

    doctor.main([])
    out = capsys.readouterr().out
    want = sampling.sampler_backends("cpu")["openvino"]
    ok, detail = _row(_section(out, "sampler backends"), "openvino (cpu)")
    assert ok == (want is None) and (detail == want if want else "CPU only" in detail)
    if want is None:
        assert ("bf16" if openvino_export.cpu_has_bf16() else "fp32 (no BF16") in detail
    assert _row(_section(out, "sampler backends"), "auto (cpu)") == (True, ": ".join(sampling.auto_backend("cpu")))
    assert _row(_section(out, "exporters"), "openvino")[0] == (openvino_export.openvino_unavailable() is None)

    why = "openvino made unavailable by this test"
    monkeypatch.setattr(openvino_export, "openvino_unavailable", lambda: why)
    doctor.main([])
    out = capsys.readouterr().out
    assert _row(_section(out, "sampler backends"), "openvino (cpu)") == (False, why)
    assert _row(_section(out, "exporters"), "openvino") == (False, why)
    ok, detail = _row(_section(out, "sampler backends"), "auto (cpu)")
    assert ok and not detail.startswith("openvino") and f"openvino: {why}" in detail
