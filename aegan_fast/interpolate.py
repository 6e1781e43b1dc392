"""Walk between seeds and real images: ``python -m aegan_fast.interpolate --ckpt RUN --seeds 1,7,42 --frames 60 --out walk.mp4``.

Keyframes are seeds (``--seeds 1,7,42``), real images (``--images a.jpg b.png``: encoded by H), or
any mix in order (``--keys 42 me.jpg proj.npz 7``: a number is a seed, an .npz is the z of ``project``,
anything else an image file). ``--frames`` frames per segment. ``--space z`` walks z (slerp by
default) and renders on the fastest Sampler here; an image keyframe is ``project``ed to its z first.
``--space embedding`` walks the embedding (lerp by default): G_E(z) of a seed, H(x) of an image,
decoded by F and φ. ``auto`` (default) is z for seeds and projections only, else the embedding.
aegan_fast.interpolation says why each space has its default method.

``--out`` ends in .mp4/.webm/.mkv/.mov (imageio + imageio-ffmpeg, or PyAV), .gif/.webp (Pillow) or
.png (a grid, a row per segment); an output no installed library can write is refused before any
rendering. Frames are rendered in batches with a progress bar and streamed into the file.
"""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from .data import to_uint8
from .errors import UserError, cli
from .interpolation import METHODS, SPACES
from .model_cli import load_model, parser, read_npz, tensor
from .sampling import parse_seeds
from .trained import Projection
from .video import FrameWriter


def keyframe(token: str):
    """--keys: a seed, the z of an .npz written by project, or an image path."""
    if token.strip().isdigit():
        return parse_seeds(token)[0]
    if token.endswith(".npz"):
        data = read_npz(token)
        if "z" not in data:
            raise UserError(f"{token} holds no z (is it an encode .npz? pass the image itself instead)")
        return Projection(tensor(data["z"]).reshape(1, -1), data.get("loss", [0.0]).tolist(), None, token)
    if not Path(token).expanduser().is_file():
        raise UserError(f"keyframe {token!r} is neither a seed, an .npz nor an image file")
    return token


@cli
def main(argv=None) -> None:
    p = parser("aegan-interpolate", __doc__, sampler=True)
    p.add_argument("--seeds", help="seed keyframes, e.g. 1,7,42 (ranges too: 0-3)")
    p.add_argument("--images", nargs="+", help="real-image keyframes (after the seeds)")
    p.add_argument("--keys", nargs="+", help="keyframes in any mix and order: seeds, images, project .npz files")
    p.add_argument("--frames", type=int, default=30, help="frames per segment (default 30)")
    p.add_argument("--fps", type=float, default=30, help="frames per second of a video or animation")
    p.add_argument("--space", choices=("auto",) + SPACES, default="auto")
    p.add_argument("--method", choices=("auto",) + METHODS, default="auto")
    p.add_argument("--loop", action="store_true", help="walk back to the first keyframe")
    p.add_argument("--truncation", type=float, default=1.0, metavar="PSI", help="z-space walks: pull z toward the mean")
    p.add_argument("--project-steps", type=int, default=300, help="Adam steps to project an image keyframe into z")
    p.add_argument("--batch", type=int, default=32, help="frames per forward pass")
    p.add_argument("--out", required=True, help="walk.mp4, .webm, .gif, .webp, or a .png grid")
    args = p.parse_args(argv)
    if args.keys and (args.seeds or args.images):
        raise UserError("--keys names every keyframe; drop --seeds and --images")
    keys = ([keyframe(t) for t in args.keys] if args.keys else
            (parse_seeds(args.seeds) if args.seeds else []) + list(args.images or []))
    if len(keys) < 2:
        raise UserError(f"an interpolation needs at least two keyframes, got {len(keys)}")
    if args.frames < 1 or args.batch < 1:
        raise UserError("--frames and --batch must be ≥ 1")
    writer = FrameWriter(args.out, args.fps, nrow=args.frames)  # refuses an unwritable --out before any work
    model = load_model(args)
    space, points = model.walk_points(keys, args.frames, space=args.space, method=args.method, loop=args.loop,
                                      truncation=args.truncation, project_steps=args.project_steps)
    with writer:
        for i in tqdm(range(0, len(points), args.batch), desc="rendering", unit="batch"):
            writer.append(to_uint8(model.render(space, points[i:i + args.batch], args.batch)))
    print(f"wrote {writer.count} frames ({space} space, {writer.kind}) to {args.out}")


if __name__ == "__main__":
    main()
