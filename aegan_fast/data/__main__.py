"""``python -m aegan_fast.data prepare SRC OUT --resolution R`` (see prepare.py for the format)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import cli
from .prepare import ENCODINGS, prepare


def _color(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("expected R,G,B, e.g. 255,255,255")
    return tuple(int(p) for p in parts)


def _holdout(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number of images, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m aegan_fast.data", description="prepare image data sets",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("prepare", help="decode a folder or zip/tar archive into a prepared data set",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("src", help="folder of images (searched recursively) or a .zip/.tar(.gz) archive")
    q.add_argument("out", help="output folder of the prepared data set")
    q.add_argument("--resolution", "-r", type=int, required=True, help="side R of the square images: a power of two ≥ 64, as training needs")
    q.add_argument("--fit", choices=("crop", "pad"), default="crop",
                   help="centre-crop to a square, or pad to one with the background colour")
    q.add_argument("--background", type=_color, default=(255, 255, 255),
                   help="R,G,B that transparency is flattened onto (and padding filled with)")
    q.add_argument("--dedup", action="store_true", help="drop exact duplicates (same source bytes)")
    q.add_argument("--holdout", type=_holdout, default="auto",
                   help="images held out of training for scoring, chosen by a hash of their names and stored "
                        "last (auto: min(1000, 30%%) for sets of 100 or more, else 0; 0: none)")
    q.add_argument("--encoded", choices=ENCODINGS, default="png",
                   help="also write one encoded file per image for DALI (jpeg: GPU-decodable, lossy)")
    q.add_argument("--jpeg-quality", type=int, default=95)
    q.add_argument("--min-side", type=int, help="skip images whose shorter side is below this (default R/4)")
    q.add_argument("--max-pixels", type=int,
                   help="skip images with more pixels than this (default: Pillow's decompression-bomb limit)")
    q.add_argument("--workers", type=int, help="decoding threads (default: CPU count, at most 8)")
    q.add_argument("--overwrite", action="store_true", help="replace a different set or interrupted run in OUT")
    q.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


@cli
def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    m = prepare(args.src, args.out, args.resolution, fit=args.fit, background=args.background, dedup=args.dedup,
                encoded=args.encoded, jpeg_quality=args.jpeg_quality, min_side=args.min_side,
                max_pixels=args.max_pixels, workers=args.workers, overwrite=args.overwrite,
                progress=not args.no_progress, holdout=args.holdout)
    out = Path(args.out)
    print(f"{out}: {m['count']} images at {m['resolution']}² ({m['count'] - m['holdout']} train / {m['holdout']} "
          f"held out for scoring), {len(m['skipped'])} skipped (reasons in {out / 'manifest.json'})")
    reasons: dict[str, int] = {}
    for s in m["skipped"]:
        key = s["reason"].split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"  {n:6d}  {reason}")


if __name__ == "__main__":
    main()
