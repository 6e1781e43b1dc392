"""The one timing harness every benchmark here uses: cases timed in interleaved rounds, medians,
ratios against named baselines, rates and the fraction of this machine's measured peaks, one table.

    ctx = Context(quick=False)
    rows = measure_peaks(ctx)                      # copy bandwidth, fp32/bf16 matmul and conv FLOP/s
    rows += measure("ops", [Case("eager", f, nbytes, "B"), Case("fused", g, nbytes, "B", ("eager",))], 7)
    fill_peak_fractions(rows, ctx.peaks)
    print(table(rows, {}, "# header"))

``measure`` warms every case up with one untimed sample, then times ``rounds`` rounds, each case
once per round in turn, so load from other processes (these machines are shared) falls on all alike:
compare ratios within one run, absolute times are noise. A case timed on a GPU names its ``device``:
the harness synchronises it before and after each sample. A case that raises becomes an error row
and the others go on.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Case:
    """One row to time. ``fn`` does ``work`` units of ``unit`` (img, FLOP or B) per call.

    A sample is the mean seconds per call over ``repeat`` calls, continued until the sample lasts
    ``min_sample_s`` (tiny ops: timer resolution; a loader: its steady rate over a window), after
    ``drain`` untimed calls (a loader's batches prefetched while the other cases had their turn)."""
    name: str
    fn: Callable[[], object]
    work: float
    unit: str
    baselines: tuple[str, ...] = ()
    note: str = ""
    peaks: tuple[str, ...] | None = None   # the measured peaks its rate is a fraction of (None: by unit)
    warmed: bool = False                   # already called once (by whoever built it)
    device: str | torch.device = "cpu"     # synchronised around each sample when it is a CUDA device
    repeat: int = 1
    min_sample_s: float = 0.0
    drain: int = 0


@dataclass
class Row:
    section: str
    name: str
    status: str                       # ok | skipped | error
    note: str = ""
    unit: str = ""
    work: float = 0.0
    samples_s: list[float] = field(default_factory=list)
    median_s: float = math.nan
    best_s: float = math.nan
    worst_s: float = math.nan
    rate: float = math.nan            # work / median_s, in unit/s
    ratios: dict[str, float] = field(default_factory=dict)   # baseline row -> its median / ours (>1: faster)
    peaks: tuple[str, ...] = ()
    peak_fraction: dict[str, float] = field(default_factory=dict)


class Context:
    """What a run shares: --quick, and the peaks measured so far (key -> unit/s)."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.peaks: dict[str, float] = {}

    def rounds(self, full: int, quick: int) -> int:
        return quick if self.quick else full


_T0 = time.perf_counter()


def progress(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


_BY_UNIT = {"FLOP": ("matmul_fp32", "matmul_bf16"), "B": ("copy",)}


def measure(section: str, cases: list[Case], rounds: int, pause_s: float = 0.0) -> list[Row]:
    """Warm every case up with one sample, not kept (unless ``warmed``), then time ``rounds`` rounds,
    each case once per round in turn; rows in the cases' order with medians, min/max, rates and ratios filled in.
    ``pause_s`` before each sample lets the previous case's thread pool (onnxruntime's, OpenVINO's)
    stop spinning."""
    rows = {c.name: Row(section, c.name, "ok", c.note, c.unit, c.work,
                        peaks=c.peaks if c.peaks is not None else _BY_UNIT.get(c.unit, ())) for c in cases}
    live = []
    for c in cases:
        if c.warmed:
            live.append(c)
            continue
        progress(f"{section}: warm-up {c.name}")
        if _guarded(c, rows[c.name], lambda c=c: _sample(c)) is not None:
            live.append(c)
    for r in range(rounds):
        for c in list(live):
            if pause_s:
                time.sleep(pause_s)
            t = _guarded(c, rows[c.name], lambda c=c: _sample(c))
            if t is None:
                live.remove(c)
            else:
                rows[c.name].samples_s.append(t)
        progress(f"{section}: round {r + 1}/{rounds} done")
    for row in rows.values():
        if row.status == "ok" and row.samples_s:
            s = row.samples_s
            row.median_s, row.best_s, row.worst_s = statistics.median(s), min(s), max(s)
            row.rate = row.work / row.median_s
    for c in cases:
        row = rows[c.name]
        for b in c.baselines:
            if row.status == "ok" and b in rows and rows[b].status == "ok":
                row.ratios[b] = rows[b].median_s / row.median_s
    return list(rows.values())


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _sample(case: Case) -> float:
    for _ in range(case.drain):
        case.fn()
    _sync(case.device)
    n, t0 = 0, time.perf_counter()
    while n < case.repeat or time.perf_counter() - t0 < case.min_sample_s:
        case.fn()
        n += 1
    _sync(case.device)
    return (time.perf_counter() - t0) / n


def _guarded(case: Case, row: Row, call: Callable[[], object]):
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - one failing row must not stop the others
        row.status, row.note = "error", f"{type(e).__name__}: {e}"
        row.samples_s.clear()
        progress(f"{row.section}: {case.name} FAILED\n{traceback.format_exc()}")
        return None


def skipped(section: str, name: str, why: str) -> Row:
    progress(f"{section}: skip {name}: {why}")
    return Row(section, name, "skipped", why)


def failed(section: str, name: str, e: BaseException) -> Row:
    return Row(section, name, "error", f"{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------------- peaks

def _peak_cases(device: str, quick: bool) -> list[tuple[str, Case]]:
    """(peak key, case) for this device. CPU: copy bandwidth (dst.copy_(src), read + write), fp32 and
    bf16 matmul 2048², conv 3×3 64→64 N16 64×64 forward fp32 NCHW and bf16 channels_last. CUDA: a
    1 GiB fp32 copy and a bf16 matmul 8192², 5 calls per sample (one synchronisation)."""
    if device == "cuda":
        src = torch.empty(2 ** 28, device=device).normal_()
        dst = torch.empty_like(src)
        n = 8192
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        return [("cuda_copy", Case(f"cuda copy_ {src.numel() * 4 / 2 ** 30:g} GiB", lambda: dst.copy_(src),
                                   2 * src.numel() * 4, "B", peaks=(), device=device, repeat=5)),
                ("cuda_matmul_bf16", Case(f"cuda matmul bf16 {n}²", lambda: a @ b, 2 * n ** 3, "FLOP", peaks=(),
                                          device=device, repeat=5))]
    mb = 64 if quick else 256
    src = torch.randn(mb * 2 ** 20 // 4)
    dst = torch.empty_like(src).copy_(src)
    n = 2048
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    conv_flops = 2 * 16 * 64 * 64 * 64 * 64 * 9
    x32, w32 = torch.randn(16, 64, 64, 64), torch.randn(64, 64, 3, 3) * 0.05
    cl = torch.channels_last
    x16, w16 = x32.bfloat16().contiguous(memory_format=cl), w32.bfloat16().contiguous(memory_format=cl)
    conv = torch.nn.functional.conv2d
    fp32_conv = "conv3x3 64→64 N16 64² fp32 NCHW"
    return [
        ("copy", Case(f"copy_ {mb} MB", lambda: dst.copy_(src), 2 * src.numel() * 4, "B")),
        ("matmul_fp32", Case(f"matmul fp32 {n}²", lambda: a32 @ b32, 2 * n ** 3, "FLOP", peaks=("matmul_fp32",))),
        ("matmul_bf16", Case(f"matmul bf16 {n}²", lambda: a16 @ b16, 2 * n ** 3, "FLOP", (f"matmul fp32 {n}²",),
                             peaks=("matmul_bf16",))),
        ("conv_fp32", Case(fp32_conv, lambda: conv(x32, w32, padding=1), conv_flops, "FLOP", peaks=("matmul_fp32",))),
        ("conv_bf16_cl", Case("conv3x3 64→64 N16 64² bf16 channels_last", lambda: conv(x16, w16, padding=1),
                              conv_flops, "FLOP", (fp32_conv,), peaks=("matmul_bf16",))),
    ]


def measure_peaks(ctx: Context, section: str = "peaks", device: str = "cpu") -> list[Row]:
    """This machine's peaks, measured now, into ``ctx.peaks`` (the best so far of each key: a peak
    is the best of its rounds, since a median on a loaded machine undercounts it). Measured again
    later in a run, a row's name says so. Keys: copy, matmul_fp32, matmul_bf16, conv_fp32,
    conv_bf16_cl on a CPU; cuda_copy, cuda_matmul_bf16 on a GPU."""
    keyed = _peak_cases(device, ctx.quick)
    again = any(k in ctx.peaks for k, _ in keyed)
    with torch.no_grad():
        rows = measure(section, [c for _, c in keyed], ctx.rounds(15, 5) if device == "cpu" else ctx.rounds(9, 3))
    for (key, _), row in zip(keyed, rows):
        if again:
            row.name += " (again, at the end)"
        if row.status == "ok":
            ctx.peaks[key] = max(ctx.peaks.get(key, 0.0), row.work / row.best_s)
            row.note = (row.note + " " if row.note else "") + f"peak (best of {len(row.samples_s)}) " + \
                rate(ctx.peaks[key], row.unit)
    return rows


def fill_peak_fractions(rows: list[Row], peaks: dict[str, float]) -> None:
    for row in rows:
        if row.status == "ok":
            row.peak_fraction = {k: row.rate / peaks[k] for k in row.peaks if peaks.get(k)}


# ---------------------------------------------------------------------------------------------- report

def rate(v: float, unit: str) -> str:
    if unit == "FLOP":
        return f"{v / 1e9:.1f} GFLOP/s"
    if unit == "B":
        return f"{v / 1e9:.1f} GB/s"
    return f"{v:.1f} {unit}/s"


def _short(baseline: str, name: str) -> str:
    """The baseline's name without the words it shares with the row's at the start."""
    b, n = baseline.split(), name.split()
    i = 0
    while i < min(len(b), len(n)) - 1 and b[i] == n[i]:
        i += 1
    return " ".join(b[i:])


def table(rows: list[Row], feats: dict, header: str) -> str:
    """One markdown table: median (min–max), rate, × each baseline, fraction of each peak, note."""
    lines = [header, ""]
    if feats:
        lines += ["features: " + ", ".join(f"{k} {v}" for k, v in feats.items()), ""]
    lines += ["| section | row | median | min–max | rate | × baseline | of peak | note |",
              "|---|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.section} | {r.name} | {r.status.upper()} | | | | | {r.note} |")
            continue
        ratios = ", ".join(f"{v:.2f}× {_short(k, r.name)}" for k, v in r.ratios.items())
        peak = " / ".join(f"{v:.0%} {k}" for k, v in r.peak_fraction.items())
        lines.append(f"| {r.section} | {r.name} | {_ms(r.median_s)} | {_ms(r.best_s)}–{_ms(r.worst_s)} | "
                     f"{rate(r.rate, r.unit)} | {ratios} | {peak} | {r.note} |")
    return "\n".join(lines)


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} µs"
