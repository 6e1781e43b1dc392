"""512×512 sampling benchmark (issue 5): latency at batch 1, throughput at batch 8 and 32, for every
Sampler backend that runs here, with parity against eager checked in the same run.

    nice -n 10 .venv/bin/python -m bench.bench_sampling [--resolution 512] [--batches 1 8 32] [--rounds 3]
        [--backends eager,openvino-bf16] [--json out.json]

For the suite (``python -m bench``): ``sampler_cases(resolution, batch)`` → {row name: zero-arg callable
sampling one batch}, the eager fp32 baseline included, every callable already warmed up.

CPU rows: ``eager`` (the nets as trained, BatchNorm through aegan_fast.ops, what `sample` ran
before the Sampler: the baseline of every ratio), ``eager-folded`` (BatchNorm folded into the
convs), ``compile`` (torch.compile of the folded chain, inductor defaults — never freezing=True),
``onnxruntime`` (CPU provider, fp32 ONNX of the folded chain, exported in this run), ``openvino-fp32``
and ``openvino-bf16`` (the IR exported in this run; bf16 only where OpenVINO's CPU lists BF16), and
``auto`` (what Sampler ``backend="auto"`` picks here; its description says which).
GPU rows, only with a CUDA device (else skipped with the reason): eager fp32, eager bf16 +
channels_last (folded), compile fp32, onnxruntime CUDA provider where the installed onnxruntime has
it, at batch 1 and 32.

Weights: the paper-size nets (max_channels 512, 58 M parameters in G_E+F+φ at R=512) with weights
redrawn so images fill [-1, 1] without saturating (convs N(0, 1/fan_in), non-trivial BatchNorm
statistics), so the parity figures mean something; at the DCGAN init the output is ~0.005 and
any parity check would pass vacuously. Speed does not depend on the values.

Each (backend, batch) is warmed up once (compiles, allocates), then timed for ``rounds`` rounds,
interleaved (bench/timing.py): every round times every backend once, eager fp32 included, so load
from other processes falls on all of them alike; a 1 s pause before each timing lets the previous backend's thread pool
(onnxruntime's, OpenMP's, OpenVINO's) stop spinning. Medians. Parity: max |backend(z) − eager(z)| and
PSNR against eager on the timed batch itself. These machines vary 10–30 % run to run, so compare
ratios within one run. Heavy on 2 cores (one 512² sample ≈ 49 GFLOP): the default rounds are few.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from aegan_fast import ops
from aegan_fast.config import TrainConfig
from aegan_fast.metrics.recon import psnr
from aegan_fast.models import ModelConfig, build_nets, sample_z
from aegan_fast.sampling import Sampler, SamplerOptions, sampler_backends
from aegan_fast.testing import lively_weights
from bench.timing import Case, measure

BATCHES = (1, 8, 32)

def make_checkpoint(folder: Path, resolution: int) -> Path:
    cfg = TrainConfig(model=ModelConfig(resolution=resolution), device="cpu")
    nets = lively_weights(build_nets(cfg.model)).eval()
    path = folder / f"bench-r{resolution}.pt"
    torch.save({"config": cfg.to_dict(), "nets": nets.state_dict()}, path)
    return path


def _runnable(makers: dict, backend_of: dict, device: str, only: set[str] | None) -> dict[str, callable]:
    """The makers whose backend runs on device (and that --only names), each skip said aloud."""
    avail = sampler_backends(device)
    out = {}
    for name, make in makers.items():
        backend = backend_of.get(name, name)
        if only and name not in only:
            continue
        if avail.get(backend):
            print(f"  skip {name}: {avail[backend]}")
            continue
        out[name] = make
    return out


class AutocastSampler:
    """The plain sampler a savvy user writes first: the nets as trained, channels_last, under one
    ``torch.autocast(bf16)`` (fp32 weights re-cast per op). A baseline, not a backend."""

    def __init__(self, ckpt: Path, device: str = "cpu"):
        self.sampler = Sampler.load(ckpt, backend="torch", device=device,
                                    options=SamplerOptions(fold=False, channels_last=True))
        self.device = torch.device(device)
        self.description = "the nets as trained, channels_last, under torch.autocast(bfloat16)"

    def __call__(self, z):
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return self.sampler(z)


def int8_sampler(ckpt: Path) -> Sampler:
    """The INT8 IR of ``ckpt`` (export --int8), its quality bound off: the bench reports the PSNR itself."""
    from aegan_fast.export.openvino_export import export_openvino
    xml = ckpt.with_name(ckpt.stem + "-int8.xml")
    if not xml.exists():
        export_openvino(ckpt, xml, int8=True, min_psnr_db=0.0)
    return Sampler.load(xml)


# Every row is compared with the plain eager fp32 sampler and the plain autocast one; the INT8 sampler
# also with the bf16 one it is meant to beat.
BASELINES = ("eager", "eager-autocast")


def baselines_of(name: str, present) -> tuple[str, ...]:
    extra = ("openvino-bf16",) if name == "openvino-int8" else ()
    return tuple(b for b in BASELINES + extra if b != name and b in present and name not in BASELINES[:1])


def cpu_samplers(ckpt: Path, only: set[str] | None) -> dict[str, callable]:
    """name → a function building that sampler, for the backends that run here."""
    from aegan_fast.export.openvino_export import cpu_has_bf16, nncf_unavailable, openvino_unavailable

    makers = {
        "eager": lambda: Sampler.load(ckpt, backend="torch", device="cpu", options=SamplerOptions(fold=False)),
        "eager-autocast": lambda: AutocastSampler(ckpt),
        "eager-folded": lambda: Sampler.load(ckpt, backend="torch", device="cpu"),
        "compile": lambda: Sampler.load(ckpt, backend="compile", device="cpu"),
        "onnxruntime": lambda: Sampler.load(ckpt, backend="onnxruntime", device="cpu"),
        "openvino-fp32": lambda: Sampler.load(ckpt, backend="openvino", device="cpu", precision="fp32"),
        "openvino-bf16": lambda: Sampler.load(ckpt, backend="openvino", device="cpu", precision="bf16"),
        "openvino-int8": lambda: int8_sampler(ckpt),
        "auto": lambda: Sampler.load(ckpt, backend="auto", device="cpu"),
    }
    if openvino_unavailable() is None and not cpu_has_bf16():
        print("  skip openvino-bf16: this CPU lists no BF16 in OpenVINO's OPTIMIZATION_CAPABILITIES")
        del makers["openvino-bf16"]
    if nncf_unavailable() is not None:
        print(f"  skip openvino-int8: {nncf_unavailable()}")
        del makers["openvino-int8"]
    return _runnable(makers, {"eager": "torch", "eager-autocast": "torch", "eager-folded": "torch",
                              "openvino-fp32": "openvino", "openvino-bf16": "openvino", "openvino-int8": "openvino",
                              "auto": "torch"}, "cpu", only)


def gpu_samplers(ckpt: Path, only: set[str] | None) -> dict[str, callable]:
    return _runnable({
        "eager": lambda: Sampler.load(ckpt, backend="torch", device="cuda", options=SamplerOptions(fold=False)),
        "eager-bf16-cl": lambda: Sampler.load(ckpt, backend="torch", device="cuda", precision="bf16",
                                              options=SamplerOptions(channels_last=True)),
        "compile": lambda: Sampler.load(ckpt, backend="compile", device="cuda"),
        "onnxruntime-cuda": lambda: Sampler.load(ckpt, backend="onnxruntime", device="cuda"),
    }, {"eager": "torch", "eager-bf16-cl": "torch", "onnxruntime-cuda": "onnxruntime"}, "cuda", only)


def build(makers: dict) -> tuple[dict, dict]:
    samplers, load_s = {}, {}
    for name, make in makers.items():
        t0 = time.perf_counter()
        samplers[name] = make()
        load_s[name] = time.perf_counter() - t0
        print(f"  loaded {name} in {load_s[name]:.1f} s: {samplers[name].description}", flush=True)
    return samplers, load_s


def run(device: torch.device, makers: dict, batches, rounds: int, z_dim: int) -> list[dict]:
    """All samplers are built first; at each batch size each backend is warmed up once (its output
    kept for parity), then the backends are timed round by round (interleaved), a pause before each."""
    samplers, load_s = build(makers)
    rows = []
    for n in batches:
        z = sample_z(n, z_dim, torch.Generator().manual_seed(n)).to(device)
        outs = {}
        for name, sampler in samplers.items():
            time.sleep(1.0)
            t0 = time.perf_counter()
            outs[name] = sampler(z).float().cpu()  # warm-up: compile (and parity-check), allocate, first touch
            print(f"  warm-up {name} batch {n}: {time.perf_counter() - t0:.1f} s", flush=True)
        timed = measure("sampling", [Case(name, lambda s=sampler: s(z), n, "img", baselines_of(name, samplers),
                                          warmed=True, device=device) for name, sampler in samplers.items()],
                        rounds, pause_s=1.0)  # the pause lets the previous backend's thread pool stop spinning
        reference = outs.get("eager")
        for name, t in zip(samplers, timed):
            if t.status != "ok":
                raise RuntimeError(f"{name} batch {n}: {t.note}")
            parity = (outs[name] - reference).abs().max().item() if reference is not None else float("nan")
            db = psnr(outs[name], reference) if reference is not None else float("nan")
            rows.append({"device": device.type, "backend": name, "batch": n, "median_s": t.median_s,
                         "img_per_s": t.rate, "times_s": t.samples_s, "max_abs_diff_vs_eager": parity,
                         "psnr_vs_eager_db": db, "load_s": load_s[name], "description": samplers[name].description,
                         "ratio_vs_eager": t.ratios.get("eager", 1.0 if name == "eager" else float("nan")),
                         "ratios": dict(t.ratios)})
            print(f"  {name:<16} batch {n:>3}: median {t.median_s * 1e3:9.1f} ms  {t.rate:6.2f} img/s  "
                  f"|Δ eager| {parity:.2e}  PSNR {db:5.1f} dB  ({len(t.samples_s)} rounds)", flush=True)
    return rows


_CASES: dict[tuple, dict] = {}  # (resolution, device) → {name: Sampler}, built once per process


def sampler_cases(resolution: int = 512, batch: int = 8, *, device: str = "cpu",
                  backends: set[str] | None = None) -> dict[str, Callable[[], torch.Tensor]]:
    """{row name: zero-arg callable sampling ``batch`` images (a timing.Case on ``device``
    synchronises it)} for every sampler backend that runs on ``device`` (``backends`` narrows it;
    ``eager``, the nets as trained in fp32 — the baseline of every ratio — is always there), on lively
    paper-size nets at ``resolution``. The samplers are built once per (resolution, device) and
    process (exports, compiles) and each callable is warmed up at this
    batch before it is returned, so timing a call times sampling only. For ``python -m bench``."""
    key = (resolution, device)
    if key not in _CASES:
        tmp = Path(tempfile.mkdtemp(prefix="aegan-bench-"))
        atexit.register(shutil.rmtree, tmp, True)
        ckpt = make_checkpoint(tmp, resolution)
        only = backends | {"eager"} if backends else None
        makers = cpu_samplers(ckpt, only) if device == "cpu" else gpu_samplers(ckpt, only)
        _CASES[key] = build(makers)[0]
    samplers = {name: s for name, s in _CASES[key].items() if not backends or name in backends | {"eager"}}
    z = sample_z(batch, ModelConfig().z_dim, torch.Generator().manual_seed(batch)).to(device)
    cases = {name: (lambda s=s: s(z)) for name, s in samplers.items()}
    for call in cases.values():
        call()
    return cases


def table(rows: list[dict]) -> str:
    lines = ["| device | backend | batch | median | img/s | × eager | × eager-autocast | × openvino-bf16 | "
             "max abs diff vs eager | PSNR vs eager |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = lambda b: f"{r['ratios'][b]:.2f}" if b in r.get("ratios", {}) else ""  # noqa: E731
        lines.append(f"| {r['device']} | {r['backend']} | {r['batch']} | {r['median_s'] * 1e3:.0f} ms | "
                     f"{r['img_per_s']:.2f} | {r['ratio_vs_eager']:.2f} | {ratio('eager-autocast')} | "
                     f"{ratio('openvino-bf16')} | {r['max_abs_diff_vs_eager']:.1e} | {r['psnr_vs_eager_db']:.1f} dB |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batches", type=int, nargs="+", default=BATCHES, help="batch sizes (default 1 8 32)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per batch size (after one warm-up)")
    p.add_argument("--backends", default=None, help="comma-separated subset, e.g. eager,compile")
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    only = set(args.backends.split(",")) | {"eager"} if args.backends else None

    print(f"# sampling benchmark R={args.resolution}  {datetime.date.today()}  torch {torch.__version__}  "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, op backend {ops.resolve('cpu')} ({ops.requested()}), "
          f"load average {os.getloadavg()[0]:.1f}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="aegan-bench-") as tmp:
        ckpt = make_checkpoint(Path(tmp), args.resolution)
        z_dim = ModelConfig().z_dim
        if args.device in ("cpu", "all"):
            print("cpu:")
            rows += run(torch.device("cpu"), cpu_samplers(ckpt, only), args.batches, args.rounds, z_dim)
        if args.device in ("cuda", "all"):
            if not torch.cuda.is_available():
                print("cuda: skipped, no CUDA device visible to torch")
            else:
                print(f"cuda: {torch.cuda.get_device_name()}")
                rows += run(torch.device("cuda"), gpu_samplers(ckpt, only), args.batches, args.rounds, z_dim)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f} (other processes on these cores slow every row)")
    print(table(rows))
    for device in sorted({r["device"] for r in rows}):
        at8 = [r for r in rows if r["device"] == device and r["batch"] == 8 and r["backend"] != "eager"]
        if at8:
            best = max(at8, key=lambda r: r["img_per_s"])
            print(f"{device}: best at batch 8: {best['backend']} {best['ratio_vs_eager']:.2f}× eager")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
