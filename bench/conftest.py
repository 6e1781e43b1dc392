"""Collect bench/bench_*.py as pytest modules, so `make bench` (pytest bench --benchmark-only) finds
them without the test_ prefix; a file named explicitly on the command line is collected by pytest
itself."""
import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
