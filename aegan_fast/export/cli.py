"""Export a trained run for fast sampling: ``python -m aegan_fast.export --ckpt RUN_DIR --out sampler.onnx``.

``--format onnx`` writes the folded sampling chain (z → image) as ONNX, checks it with
onnx.checker and validates it with ONNX Runtime against the torch nets on random z.
``--format openvino`` converts that fp32 ONNX to an OpenVINO IR (sampler.xml + sampler.bin, fp32
weights; bf16 is chosen when the Sampler compiles it) and checks the IR against the torch nets;
with ``--int8`` the decoder F∘φ is quantized to INT8 by NNCF and its samples checked against fp32.
``--format tensorrt`` does the same in fp16, then builds a TensorRT engine from that ONNX with a
batch profile, a workspace limit and a timing cache, and writes a JSON sidecar beside it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import resolve_checkpoint
from ..errors import CheckFailed, UserError, cli
from . import SUFFIXES, path_kind
from .onnx_export import OPSET, export_checkpoint
from .openvino_export import CALIBRATION_N, INT8_MIN_PSNR_DB, export_openvino, openvino_unavailable
from .trt import build_engine, check_profile, make_sidecar, sidecar_path, tensorrt_unavailable, write_sidecar

# The kind of file (export.SUFFIXES) each --format writes, and what it is called in messages.
FORMATS = {"onnx": ("onnx", "an ONNX file"), "openvino": ("xml", "an OpenVINO IR"),
           "tensorrt": ("plan", "a TensorRT engine")}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aegan-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="run directory (its latest checkpoint) or a checkpoint file")
    p.add_argument("--format", choices=tuple(FORMATS), default="onnx")
    p.add_argument("--out", required=True,
                   help="sampler.onnx, sampler.xml for --format openvino, or sampler.plan for --format tensorrt")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default=None,
                   help="compute dtype of the graph (default: fp32 for onnx, fp16 for tensorrt; openvino "
                        "is always fp32 on disk and runs in bf16 where the CPU has it)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--batch", type=int, default=None, help="a fixed batch size")
    size.add_argument("--dynamic-batch", action="store_true", help="a symbolic batch dimension (the default)")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset, ≥ 17 (default {OPSET})")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even when EMA weights exist")
    p.add_argument("--no-denoise", action="store_true", help="export G_E → F only, without φ")
    ov = p.add_argument_group("openvino")
    ov.add_argument("--int8", action="store_true",
                    help="quantize the decoder F∘φ to INT8 with NNCF (G_E and the last conv stay fp32); refused "
                         "when its samples fall under --int8-min-psnr against fp32")
    ov.add_argument("--int8-min-psnr", type=float, default=None, metavar="DB",
                    help="the least mean PSNR (dB) of INT8 samples against fp32 that an export accepts (default 30)")
    ov.add_argument("--calibration-n", type=int, default=None, help="seeded z NNCF calibrates on (default 128)")
    trt = p.add_argument_group("tensorrt")
    trt.add_argument("--min-batch", type=int, default=None, help="profile minimum batch (default 1)")
    trt.add_argument("--opt-batch", type=int, default=None, help="profile batch to tune for (default 8)")
    trt.add_argument("--max-batch", type=int, default=None, help="profile maximum batch (default 32)")
    trt.add_argument("--workspace-gb", type=float, default=None, help="builder workspace limit in GiB (default 4)")
    trt.add_argument("--timing-cache", default=None,
                     help="timing cache file, read and updated (default: OUT with suffix .timing-cache)")
    trt.add_argument("--onnx", default=None, help="where to keep the fp16 ONNX the engine is built from "
                                                  "(default: OUT with suffix .onnx)")
    return p


def check_args(args) -> None:
    """Every argument check that needs neither the checkpoint nor TensorRT; raises UserError."""
    out = Path(args.out)
    if args.batch is not None and args.batch < 1:
        raise UserError("--batch must be ≥ 1")
    if args.opset < 17:
        raise UserError(f"--opset {args.opset}: opset 17 or newer is needed")
    trt_flags = {"--min-batch": args.min_batch, "--opt-batch": args.opt_batch, "--max-batch": args.max_batch,
                 "--workspace-gb": args.workspace_gb, "--timing-cache": args.timing_cache, "--onnx": args.onnx}
    kind, what = FORMATS[args.format]
    if path_kind(out) != kind:
        raise UserError(f"--out {args.out}: {what} ends in {', '.join(SUFFIXES[kind])}")
    int8_flags = {"--int8": args.int8 or None, "--int8-min-psnr": args.int8_min_psnr, "--calibration-n": args.calibration_n}
    if args.format != "openvino" and any(v is not None for v in int8_flags.values()):
        raise UserError(f"{', '.join(f for f, v in int8_flags.items() if v is not None)} only apply to --format openvino")
    if not args.int8 and (args.int8_min_psnr is not None or args.calibration_n is not None):
        raise UserError("--int8-min-psnr and --calibration-n only apply with --int8")
    if args.calibration_n is not None and args.calibration_n < 1:
        raise UserError("--calibration-n must be ≥ 1")
    if args.format in ("onnx", "openvino"):
        given = [flag for flag, v in trt_flags.items() if v is not None]
        if given:
            raise UserError(f"{', '.join(given)} only apply to --format tensorrt")
        if args.format == "openvino":
            if args.dtype not in (None, "fp32"):
                raise UserError("--format openvino writes fp32 weights (bf16 is picked when it runs); leave out --dtype")
            if args.batch is not None:
                raise UserError("--format openvino keeps a dynamic batch (it measured faster than a fixed one); "
                                "leave out --batch")
        return
    if args.batch is not None:
        if any(v is not None for v in (args.min_batch, args.opt_batch, args.max_batch)):
            raise UserError("--batch fixes the engine's batch; leave out --min-batch/--opt-batch/--max-batch")
        args.min_batch = args.opt_batch = args.max_batch = args.batch
    else:
        args.min_batch = 1 if args.min_batch is None else args.min_batch
        args.max_batch = max(32, args.min_batch) if args.max_batch is None else args.max_batch
        args.opt_batch = min(max(8, args.min_batch), args.max_batch) if args.opt_batch is None else args.opt_batch
    try:
        check_profile(args.min_batch, args.opt_batch, args.max_batch)
    except ValueError as e:
        raise UserError(f"--min-batch/--opt-batch/--max-batch: {e}") from None
    if args.workspace_gb is not None and not args.workspace_gb > 0:
        raise UserError("--workspace-gb must be > 0")
    onnx_path = Path(args.onnx) if args.onnx else out.with_suffix(".onnx")
    if onnx_path.suffix.lower() != ".onnx":
        raise UserError(f"--onnx {args.onnx}: an ONNX file ends in .onnx")
    if onnx_path.resolve() == out.resolve() or sidecar_path(out).resolve() == onnx_path.resolve():
        raise UserError("--onnx must differ from the engine and its sidecar")


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


@cli
def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    check_args(args)
    dtype = args.dtype or ("fp16" if args.format == "tensorrt" else "fp32")
    out = Path(args.out)
    if args.format == "tensorrt":
        reason = tensorrt_unavailable()
        if reason:
            raise UserError(f"--format tensorrt: {reason}")
    if args.format == "openvino":
        reason = openvino_unavailable()
        if reason:
            raise UserError(f"--format openvino: {reason} (pip install -r requirements.txt)")
    resolve_checkpoint(args.ckpt)
    if args.format == "openvino":
        int8 = {} if not args.int8 else {
            "int8": True, "min_psnr_db": INT8_MIN_PSNR_DB if args.int8_min_psnr is None else args.int8_min_psnr,
            "calibration_n": CALIBRATION_N if args.calibration_n is None else args.calibration_n}
        rep = export_openvino(args.ckpt, out, opset=args.opset, use_ema=not args.no_ema, denoise=not args.no_denoise,
                              **int8)  # an INT8 export under its bound is an ExportError: exit 1, nothing written
        weights = "INT8 decoder, fp32 G_E" if args.int8 else "fp32 weights"
        print(f"wrote {out} + {out.with_suffix('.bin').name} (OpenVINO IR, {weights}, dynamic batch, "
              f"{_size(out.with_suffix('.bin'))}); OpenVINO fp32 vs torch: max abs diff {rep['max_abs_diff']:.2e} "
              f"(bound {rep['tolerance']:g}); ONNX Runtime vs torch {rep['onnx_max_abs_diff']:.2e}"
              + (f"; INT8 samples vs fp32: {rep['int8']['psnr_mean']:.1f} dB PSNR on average, "
                 f"{rep['int8']['psnr_min']:.1f} at worst (bound {int8['min_psnr_db']:g})" if args.int8 else ""))
        return

    onnx_out = out if args.format == "onnx" else (Path(args.onnx) if args.onnx else out.with_suffix(".onnx"))
    # A fixed-batch engine is built from a fixed-batch ONNX; a profile needs the dynamic one.
    rep = export_checkpoint(args.ckpt, onnx_out, dtype=dtype, batch=args.batch, opset=args.opset,
                            use_ema=not args.no_ema, denoise=not args.no_denoise)
    shape = f"batch {args.batch}" if args.batch else "dynamic batch"
    print(f"wrote {onnx_out} ({dtype}, {shape}, opset {args.opset}, {rep['exporter']} exporter, {_size(onnx_out)}); "
          f"onnxruntime vs torch: max abs diff {rep['max_abs_diff']:.2e} (bound {rep['tolerance']:g})")
    if args.format == "onnx":
        return

    workspace = int((args.workspace_gb or 4.0) * 2**30)
    timing_cache = Path(args.timing_cache) if args.timing_cache else out.with_suffix(".timing-cache")
    try:
        built = build_engine(onnx_out, out, z_dim=rep["z_dim"], min_batch=args.min_batch, opt_batch=args.opt_batch,
                             max_batch=args.max_batch, workspace_bytes=workspace, timing_cache=timing_cache)
    except RuntimeError as e:  # the builder rejected the network: the run failed a check, exit 1
        raise CheckFailed(str(e)) from None
    info = make_sidecar(engine=out, io=built["io"], profile={"min": args.min_batch, "opt": args.opt_batch,
                                                             "max": args.max_batch},
                        tensorrt_version=built["tensorrt_version"], checkpoint=rep["checkpoint"],
                        checkpoint_sha256=rep["checkpoint_sha256"], onnx_path=onnx_out, z_dim=rep["z_dim"],
                        resolution=rep["resolution"], denoise=rep["denoise"], dtype=dtype,
                        workspace_bytes=workspace, device=built["device"])
    side = write_sidecar(out, info)
    print(f"wrote {out} (TensorRT {built['tensorrt_version']}, {dtype}, batch {args.min_batch}/{args.opt_batch}/"
          f"{args.max_batch}, {_size(out)}), sidecar {side}, timing cache {timing_cache}")


if __name__ == "__main__":
    main()
