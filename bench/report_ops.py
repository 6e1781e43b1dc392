"""Print the CPU ops benchmark as markdown tables: medians, speedups over eager, GB/s and the
fraction of the memory bandwidth (copy_ / in-place add_, the faster) measured in the same run.
fp32 rows are compared with eager fp32; the bf16 channels_last rows (test_fwd_bwd_bf16) with eager
bf16 channels_last, in a table of their own.

    .venv/bin/python bench/report_ops.py .benchmarks/ops.json      (from pytest --benchmark-json)
"""
from __future__ import annotations

import json
import sys


def load(path):
    with open(path) as f:
        doc = json.load(f)
    rows = []
    for bm in doc["benchmarks"]:
        info = bm.get("extra_info", {})
        rows.append(dict(info, median=bm["stats"]["median"]))
    return doc, rows


def report(path) -> str:
    doc, rows = load(path)
    lines = []
    machine = doc.get("machine_info", {})
    lines.append(f"cpu: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} "
                 f"logical cores; torch {doc.get('torch', '')}".rstrip("; torch "))
    bw: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("kind") == "copy":
            bw.setdefault(r["shape"], {})[r.get("how", "copy_")] = r["bytes"] / r["median"] / 1e9
    copy = {shape: max(v.values()) for shape, v in bw.items()}
    for shape in sorted(copy):
        each = ", ".join(f"{how} {gbs:.1f} GB/s" for how, gbs in sorted(bw[shape].items()))
        lines.append(f"\nmemory bandwidth ({shape}x{shape} activation, read+write): {each}; "
                     f"roofline = {copy[shape]:.1f} GB/s\n")
        for dtype, layout in (("fp32", "NCHW"), ("bf16", "channels_last")):
            fb = [r for r in rows if r.get("kind") == "fwd_bwd" and r["shape"] == shape
                  and r.get("dtype", "fp32") == dtype and r.get("layout", "NCHW") == layout]
            if not fb:
                continue
            if dtype != "fp32":
                lines.append(f"\n{dtype} {layout} activations, fp32 parameters ({shape}x{shape}); speedup vs eager "
                             f"{dtype}:\n")
            lines.append(f"| op | impl | median ms | speedup vs eager {dtype} | GB/s | of roofline |")
            lines.append("|---|---|---:|---:|---:|---:|")
            for op in ("bn_act", "bn_add_act"):
                base = next((r["median"] for r in fb if r["op"] == op and r["impl"] == "reference"), None)
                for impl in ("reference", "compiled", "cpp"):
                    r = next((r for r in fb if r["op"] == op and r["impl"] == impl), None)
                    if r is None:
                        continue
                    gbs = r["bytes"] / r["median"] / 1e9
                    name = {"reference": "eager reference", "compiled": "torch.compile(reference)", "cpp": "cpp"}[impl]
                    sp = f"{base / r['median']:.2f}x" if base else "-"
                    lines.append(f"| {op} fwd+bwd | {name} | {r['median'] * 1e3:.1f} | {sp} | {gbs:.1f} | "
                                 f"{gbs / copy[shape]:.0%} |")
        passes = [r for r in rows if r.get("kind") == "cpp_pass" and r["shape"] == shape]
        if passes:
            lines.append(f"\ncpp kernels into preallocated buffers ({shape}x{shape}, bn_act leaky_relu):\n")
            lines.append("| pass | median ms | GB/s | of roofline |")
            lines.append("|---|---:|---:|---:|")
            for part in ("fwd_apply", "bwd_apply_eval", "fwd_train", "bwd_train"):
                r = next((r for r in passes if r["part"] == part), None)
                if r is None:
                    continue
                gbs = r["bytes"] / r["median"] / 1e9
                lines.append(f"| {part} | {r['median'] * 1e3:.1f} | {gbs:.1f} | {gbs / copy[shape]:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(report(sys.argv[1]))
