"""Embeddings (or z) to images: ``python -m aegan_fast.decode --ckpt RUN emb.npz --out grid.png``.

Reads the .npz of ``encode`` (``embeddings``: decoded by F, then φ where the run has one) or of
``project`` (``z``: through G_E first, the sampling chain). ``--out DIR/`` writes one PNG per image,
named after the images it came from.
"""
from __future__ import annotations

from pathlib import Path

from .errors import UserError, cli
from .model_cli import check_image_out, load_model, parser, read_npz, tensor, write_images


@cli
def main(argv=None) -> None:
    p = parser("aegan-decode", __doc__)
    p.add_argument("npz", help="an .npz written by encode (embeddings) or project (z)")
    p.add_argument("--out", required=True, help="grid.png, or DIR/ for one PNG per image")
    p.add_argument("--no-denoise", action="store_true", help="skip φ: show F's output")
    p.add_argument("--labels", action="store_true", help="write each image's name into its grid cell")
    args = p.parse_args(argv)
    out, as_folder = check_image_out(args.out)
    data = read_npz(args.npz)
    if "embeddings" in data:
        points, what = tensor(data["embeddings"]), "embeddings"
    elif "z" in data:
        points, what = tensor(data["z"]), "z"
    else:
        raise UserError(f"{args.npz} holds neither embeddings nor z (keys: {', '.join(data) or 'none'})")
    model = load_model(args)
    if what == "z":
        points = model.generate_embedding(points)
    images = model.decode(points, denoise=not args.no_denoise, progress=True)
    names = [Path(str(n)).stem for n in data.get("names", data.get("name", []))]
    names = names if len(names) == len(images) else [f"image{i:05d}" for i in range(len(images))]
    print(write_images(images, out, as_folder, names, names if args.labels else None))


if __name__ == "__main__":
    main()
