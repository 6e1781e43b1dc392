"""Real images to embeddings: ``python -m aegan_fast.encode --ckpt RUN IMAGES... --out emb.npz``.

Each image (files, or folders of them) is prepared exactly as training prepares a folder and mapped by
the encoder H to its R/16 × R/16 × 64 embedding: no optimisation. The .npz holds ``embeddings``
(N × C × h × w, float32), ``names`` and ``resolution``; ``python -m aegan_fast.decode`` turns it back
into images. A file that cannot be used is one line on stderr naming it; the others are still
encoded and written, and the exit code is then 2.
"""
from __future__ import annotations


import numpy as np

from .data import to_float
from .errors import cli
from .model_cli import check_failures, load_model, output, parser, read_user_images, write_npz


@cli
def main(argv=None) -> None:
    p = parser("aegan-encode", __doc__, images=True)
    p.add_argument("--out", required=True, help="the .npz to write")
    args = p.parse_args(argv)
    out = output(args.out, ".npz")
    model = load_model(args)
    read = read_user_images(model, args.images, args.fit)
    embeddings = model.encode(to_float(read.images))
    write_npz(out, embeddings=embeddings.numpy(), names=np.array(read.names), resolution=model.resolution)
    print(f"wrote {len(read.names)} embeddings ({' × '.join(map(str, embeddings.shape[1:]))}) to {out}")
    check_failures(read)

if __name__ == "__main__":
    main()
