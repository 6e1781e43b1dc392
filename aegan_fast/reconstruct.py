"""How well the autoencoder keeps real images: ``python -m aegan_fast.reconstruct --ckpt RUN IMAGES... --out sheet.png``.

One row per image: the input x (prepared as training prepares a folder) | F(H(x)) | φ(F(H(x))) where
the run has a denoiser, with each row's PSNR (dB, of the last column against x) written into its
last cell and printed as a table with the full names. A file that cannot be used is one line on stderr naming it; the
others still make the sheet, and the exit code is then 2.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .data import to_float
from .errors import cli
from .model_cli import check_failures, load_model, output, parser, read_user_images, write_images


@cli
def main(argv=None) -> None:
    p = parser("aegan-reconstruct", __doc__, images=True)
    p.add_argument("--out", required=True, help="the sheet, a .png")
    args = p.parse_args(argv)
    out = output(args.out, ".png")
    model = load_model(args)
    read = read_user_images(model, args.images, args.fit)
    rec = model.reconstruct(to_float(read.images))
    columns = [rec.inputs, rec.decoded] + ([rec.denoised] if rec.denoised is not None else [])
    cells = torch.stack(columns, 1).flatten(0, 1)
    names = [Path(n).name for n in read.names]
    labels = []
    for name, db in zip(names, rec.psnr):  # a 64-pixel cell holds about 10 characters
        labels += [name[:9]] + ([] if rec.denoised is None else ["F(H(x))"]) + [f"{db:.1f} dB"]
    print(write_images(cells, out, False, [], labels, nrow=len(columns)))
    width = max(len(n) for n in names)
    print(f"{'image':<{width}}  PSNR dB ({'phi(F(H(x)))' if rec.denoised is not None else 'F(H(x))'} vs x)")
    for name, db in zip(names, rec.psnr):
        print(f"{name:<{width}}  {db:7.2f}")
    print(f"{'mean':<{width}}  {sum(rec.psnr) / len(rec.psnr):7.2f}")
    check_failures(read)


if __name__ == "__main__":
    main()
