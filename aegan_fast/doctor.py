"""What this installation can do: ``python -m aegan_fast.doctor``.

Prints versions, the device, and which op backends, data loaders and exporters load here, and for
each one that does not, why.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import shutil
import sys

from .errors import cli

OK, NO = "yes", "no "


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _module(name: str) -> str | None:
    """None when the module imports, else the reason it does not."""
    try:
        importlib.import_module(name)
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}".splitlines()[0]


def report() -> list[tuple[str, list[tuple[str, str | None, str]]]]:
    """Sections of (name, failure reason or None, detail)."""
    import torch

    from . import __version__, ops

    env = [("aegan_fast", None, __version__), ("python", None, platform.python_version()),
           ("torch", None, f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")]
    for dist in ("numpy", "pillow", "triton", "onnx", "onnxruntime", "openvino", "tensorrt", "nvidia-dali-cuda130"):
        v = _version(dist)
        env.append((dist, None if v else "not installed", v or ""))

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = [("cuda", None, f"{torch.cuda.device_count()}× {props.name}, sm_{props.major}{props.minor}, "
                                 f"{props.total_memory / 2**30:.0f} GiB")]
    else:
        device = [("cuda", "no CUDA device visible to torch", "")]
    device.append(("cpu", None, f"{os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"))

    return [("environment", env), ("device", device), ("op backends", _rows(backend_rows, ops)),
            ("data", _rows(data_rows, torch)), ("exporters", _rows(exporter_rows)),
            ("sampler backends", _rows(sampler_rows, torch))]


def _rows(section, *args) -> list[tuple[str, str | None, str]]:
    """A section's rows; one that cannot even be asked (a module that fails to import) becomes one
    failed row with the reason, so the doctor still reports everything else."""
    try:
        return section(*args)
    except Exception as e:
        return [("(this section)", f"{type(e).__name__}: {e}".splitlines()[0], "")]


def backend_rows(ops) -> list[tuple[str, str | None, str]]:
    """One row per op backend, straight from ``ops.availability()``, plus what AEGAN_OPS asks for
    (an unavailable or unknown request is a failure here, before a training run trips on it)."""
    available = ops.availability()
    rows: list[tuple[str, str | None, str]] = [(name, reason, "available") for name, reason in available.items()]
    requested = os.environ.get("AEGAN_OPS", "auto")
    if requested == "auto":
        why = None
    elif requested not in available:
        why = f"AEGAN_OPS={requested}: unknown backend (choose auto or one of {', '.join(available)})"
    else:
        why = available[requested] and f"AEGAN_OPS={requested}: {available[requested]}"
    rows.append(("requested", why, f"{requested} (AEGAN_OPS; aegan_fast.train --ops overrides it)"))
    return rows


def data_rows(torch) -> list[tuple[str, str | None, str]]:
    npm = shutil.which("npm")
    from .data import dali_unavailable
    dali_why = dali_unavailable()
    loaders = [("torch (uint8, RAM or mmap)", None, "always"),
               ("dali (cpu decode)", dali_why, "--loader dali"),
               ("dali (gpu decode)", dali_why or (None if torch.cuda.is_available() else "no CUDA device"),
                "--loader dali on a GPU, JPEG files"),
               ("built-in emoji set", None if npm else "npm not found (needed once to fetch it)", npm or "")]
    return loaders


def exporter_rows() -> list[tuple[str, str | None, str]]:
    from .export.openvino_export import openvino_unavailable
    return [("onnx", _module("onnx"), ""), ("onnxruntime", _module("onnxruntime"), ""),
            ("openvino", openvino_unavailable(), "--format openvino (IR from the ONNX export)"),
            ("tensorrt", _module("tensorrt"), "")]


def sampler_rows(torch) -> list[tuple[str, str | None, str]]:
    """aegan_fast.sampling.Sampler backends, on the GPU when there is one, else on the CPU."""
    from .export.onnx_export import exporter
    from .export.openvino_export import cpu_has_bf16, openvino_unavailable
    from .sampling import auto_backend, sampler_backends

    device = "cuda" if torch.cuda.is_available() else "cpu"
    details = {"torch": "eager, BatchNorm folded", "compile": "torch.compile, parity-checked against eager",
               "tensorrt": "engines from `aegan_fast.export --format tensorrt`"}
    name, detail = exporter()
    if name and _module("onnxruntime") is None:
        import onnxruntime
        details["onnxruntime"] = f"providers {', '.join(onnxruntime.get_available_providers())}; export: {detail}"
    if openvino_unavailable() is None:
        details["openvino"] = ("bf16 (BF16 in the CPU's OPTIMIZATION_CAPABILITIES)" if cpu_has_bf16()
                               else "fp32 (no BF16 in the CPU's OPTIMIZATION_CAPABILITIES)") + ", CPU only"
    rows = [(f"{backend} ({device})", reason, details.get(backend, ""))
            for backend, reason in sampler_backends(device).items()]
    chosen, why = auto_backend(device)
    return rows + [(f"auto ({device})", None, f"{chosen}: {why}")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m aegan_fast.doctor",
                                description="Report versions, the device, and which op backends, data loaders, "
                                            "exporters and sampler backends load here, and for each one that "
                                            "does not, why. It reports and does not judge: whatever it finds, it exits 0.")
    return p.parse_args(argv)


@cli
def main(argv=None) -> None:
    parse_args(argv)
    for title, rows in report():
        print(f"\n{title}")
        for name, reason, detail in rows:
            mark = OK if reason is None else NO
            print(f"  {mark} {name:<24} {detail if reason is None else reason}")
    print()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
