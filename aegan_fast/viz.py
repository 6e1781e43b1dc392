"""Pictures: sample grids (PNG) and the loss-curve plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image

from .checkpoint import atomic_write_bytes
from .data import to_uint8


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, pad_value: int = 255) -> torch.Tensor:
    """uint8 3×H×W grid of N×3×h×w images in [-1, 1], nrow images per row (default: square)."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=torch.uint8)
    pixels = to_uint8(images.cpu())
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, top:top + h, left:left + w] = pixels[i]
    return grid


def save_png(image_chw_uint8: torch.Tensor, path: Path) -> None:
    im = Image.fromarray(image_chw_uint8.permute(1, 2, 0).numpy())
    atomic_write_bytes(Path(path), lambda f: im.save(f, format="PNG"))


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    save_png(make_grid(images, nrow), path)


def plot_metrics(metrics_jsonl: Path, out_png: Path) -> None:
    """Loss curves of every net against total kimg, stage boundaries marked, throughput below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    rows = [r for r in lines if "losses" in r]
    evals = [r for r in lines if "eval" in r]
    if not rows:
        return
    keys = sorted({k for r in rows for k in r["losses"]})
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for r in evals:  # stage-end evaluation, written where the stage ends
        text = "\n".join(f"{k} {v:.3g}" for k, v in r["eval"].items() if not k.startswith("swd_"))
        ax2.annotate(text, (r["kimg"], 0), xycoords=("data", "axes fraction"), fontsize=7, ha="right",
                     va="bottom", color="tab:blue")
    for k in keys:
        pts = [(r["kimg"], r["losses"][k]) for r in rows if k in r["losses"]]
        ax.plot(*zip(*pts), label=k, lw=1.2)
    prev = rows[0]["stage"]
    for r in rows:
        if r["stage"] != prev:
            for a in (ax, ax2):
                a.axvline(r["kimg"], color="gray", ls="--", lw=0.8)
            ax.text(r["kimg"], ax.get_ylim()[1], f" {r['stage']}", va="top", fontsize=8, color="gray")
            prev = r["stage"]
    # Log scale shows every net's loss on one axis; hinge/LSGAN generator losses can go negative,
    # and then a linear region around zero keeps them visible.
    if all(v > 0 for r in rows for v in r["losses"].values()):
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylabel("loss")
    ax.legend(fontsize=8, ncol=3)
    ax.set_title("AEGAN training losses")
    ax2.plot([r["kimg"] for r in rows], [r["img_per_s"] for r in rows], color="k", lw=1)
    ax2.set_ylabel("img/s")
    ax2.set_xlabel("kimg (all stages)")
    fig.tight_layout()
    atomic_write_bytes(Path(out_png), lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
