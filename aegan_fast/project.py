"""Find the z of a real image: ``python -m aegan_fast.project --ckpt RUN photo.jpg --out proj.npz``.

The z in [-1, 1]^d whose G_E(z) is nearest the image's embedding H(x), by Adam on the embedding
distance (``TrainedModel.project``: several seeded starts at once, the best kept). Writes the .npz
(``z``, ``loss``, ``name``: interpolate takes it as a keyframe, decode renders it), beside it
``<out>.png`` (x | F(H(x)) | the chain's image of the found z) and ``<out>-loss.png`` (the loss curve).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import cli
from .model_cli import load_model, output, parser, write_images, write_npz


@cli
def main(argv=None) -> None:
    p = parser("aegan-project", __doc__)
    p.add_argument("image", help="one image file")
    p.add_argument("--out", required=True, help="the .npz to write (the pictures go beside it)")
    p.add_argument("--steps", type=int, default=300, help="Adam steps (default 300)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam's learning rate (default 0.05)")
    p.add_argument("--restarts", type=int, default=8, help="seeded starts run at once; the best is kept (default 8)")
    p.add_argument("--seed", type=int, default=0, help="the first start's seed")
    args = p.parse_args(argv)
    out = output(args.out, ".npz")
    model = load_model(args)
    fit = model.project(args.image, steps=args.steps, lr=args.lr, restarts=args.restarts, seed=args.seed,
                        progress=True)
    write_npz(out, z=fit.z.numpy(), loss=np.array(fit.loss, dtype=np.float32), name=np.array([fit.name]))
    x, _ = model.images(args.image)
    found = model.decode(model.generate_embedding(fit.z))
    write_images(torch.cat([x, model.decode(fit.target), found]), out.with_suffix(".png"), False, [],
                 ["x", "F(H(x))", "G_E(z)"], nrow=3)
    plot_loss(fit.loss, out.with_name(f"{out.stem}-loss.png"))
    print(f"embedding distance {fit.loss[0]:.4g} → {fit.final_loss:.4g} in {len(fit.loss)} steps")
    print(f"wrote {out}, {out.with_suffix('.png').name} and {out.stem}-loss.png")


def plot_loss(loss: list[float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4, 2.6), dpi=100)
    ax.plot(range(1, len(loss) + 1), loss)
    ax.set_yscale("log")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("‖G_E(z) − H(x)‖² / n")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
