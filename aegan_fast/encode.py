"""Real images to embeddings: ``python -m aegan_fast.encode --ckpt RUN IMAGES... --out emb.npz``.

Each image (files, or folders of them) is prepared exactly as training prepares a folder and mapped by
the encoder H to its R/16 × R/16 × 64 embedding: no optimisation. The .npz holds ``embeddings``
(N × C × h × w, float32), ``names`` and ``resolution``; ``python -m aegan_fast.decode`` turns it back
into images. A file that cannot be used is one line on stderr naming it; the others are still
encoded and written, and the exit code is then 2.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import read_images, to_float
from .errors import UserError, cli
from .model_cli import load_model, parser, report_failures, write_npz


@cli
def main(argv=None) -> None:
    p = parser("aegan-encode", __doc__)
    p.add_argument("images", nargs="+", help="image files or folders of them")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--fit", choices=("crop", "pad"), default="crop",
                   help="make a non-square image square by a centre crop (default, as training) or by padding")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".npz":
        raise UserError(f"--out {out}: give a .npz file")
    model = load_model(args)
    read = read_images(args.images, model.resolution, args.fit)
    report_failures(read.failed)
    if not read.names:
        raise UserError("none of the images could be used")
    embeddings = model.encode(to_float(read.images))
    write_npz(out, embeddings=embeddings.numpy(), names=np.array(read.names), resolution=model.resolution)
    print(f"wrote {len(read.names)} embeddings ({' × '.join(map(str, embeddings.shape[1:]))}) to {out}")
    if read.failed:
        raise UserError(f"{len(read.failed)} of {len(read.failed) + len(read.names)} files could not be used (above)")


if __name__ == "__main__":
    main()
