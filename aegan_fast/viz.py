"""Pictures: sample grids (PNG) and the loss-curve plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import to_uint8
from .files import atomic_write_bytes


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, pad_value: int = 255,
              labels: list[str] | None = None) -> torch.Tensor:
    """uint8 3×H×W grid of N×3×h×w images in [-1, 1], nrow images per row (default: square);
    ``labels`` (one per image, e.g. its seed) are written into each image's top-left corner."""
    n, c, h, w = images.shape
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} images")
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=torch.uint8)
    pixels = to_uint8(images.cpu())
    corners = []
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, top:top + h, left:left + w] = pixels[i]
        corners.append((left, top))
    return grid if labels is None else _label(grid, corners, labels)


def _label(grid: torch.Tensor, corners: list, labels: list[str]) -> torch.Tensor:
    """Each label in black on a white box at its corner (readable on any image)."""
    from PIL import ImageDraw
    im = Image.fromarray(grid.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(im)
    for (left, top), text in zip(corners, labels):
        x0, y0, x1, y1 = draw.textbbox((left + 2, top + 1), str(text))
        draw.rectangle((left, top, x1 + 2, y1 + 1), fill=(255, 255, 255))
        draw.text((left + 2, top + 1), str(text), fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def save_png(image_chw_uint8: torch.Tensor, path: Path) -> None:
    im = Image.fromarray(image_chw_uint8.permute(1, 2, 0).numpy())
    atomic_write_bytes(Path(path), lambda f: im.save(f, format="PNG"))


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, labels: list[str] | None = None) -> None:
    save_png(make_grid(images, nrow, labels=labels), path)


# Stage-end metrics in the order people read them, with the direction that is better.
EVAL_ORDER = ("swd", "msssim", "psnr", "l1")
EVAL_TITLES = {"swd": "SWD (lower is better)", "msssim": "MS-SSIM (near the real set's)",
               "psnr": "PSNR dB (higher is better)", "l1": "L1 (lower is better)"}


def stage_end_metrics(lines: list[dict]) -> dict[str, dict[str, float]]:
    """{metric: {stage: value}} from metrics.jsonl's eval rows, stages in the order they ended; a stage
    evaluated twice (finished again after a rollback) shows its last figures. Per-scale SWD parts are
    left out: the total says it at a glance."""
    last = {}
    for r in lines:
        if isinstance(r.get("eval"), dict):
            last.pop(r["stage"], None)
            last[r["stage"]] = r["eval"]
    names = {k for ev in last.values() for k in ev if not k.startswith("swd_")}
    order = [k for k in EVAL_ORDER if k in names] + sorted(names - set(EVAL_ORDER))
    return {k: {stage: float(ev[k]) for stage, ev in last.items() if k in ev} for k in order}


def plot_metrics(metrics_jsonl: Path, out_png: Path) -> dict | None:
    """Loss curves of every net against total kimg, stage boundaries marked, throughput below, and a
    row of small panels with each stage-end metric per stage, values written on (the stage the run
    samples from starred on SWD). Returns what the panels show, {"eval": {metric: {stage: value}},
    "kept": stage or None}, or None when there is no loss row to plot (nothing is written then)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:  # a row cut short by a kill mid-append
            continue
    rows = [r for r in lines if "losses" in r]
    if not rows:
        return None
    evals = stage_end_metrics(lines)
    kept = ([r["kept"] for r in lines if "kept" in r] or [None])[-1]
    keys = sorted({k for r in rows for k in r["losses"]})
    cols = max(1, len(evals))
    fig = plt.figure(figsize=(10, 9 if evals else 7))
    grid = fig.add_gridspec(3 if evals else 2, cols, height_ratios=[3, 1, 1.4][:3 if evals else 2])
    ax = fig.add_subplot(grid[0, :])
    ax2 = fig.add_subplot(grid[1, :], sharex=ax)
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
    for i, (name, per_stage) in enumerate(evals.items()):
        a = fig.add_subplot(grid[2, i])
        stages, values = list(per_stage), list(per_stage.values())
        a.plot(range(len(values)), values, "o-", color="tab:blue", lw=1, ms=5)
        labels = []
        for x, (stage, v) in enumerate(per_stage.items()):
            best = name == "swd" and stage == kept
            if best:
                a.plot([x], [v], "*", color="tab:red", ms=12)
            a.annotate(f"{v:.3g}", (x, v), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8,
                       color="tab:red" if best else "black", fontweight="bold" if best else "normal")
            labels.append(f"{stage}\n★ sampled" if best else stage)
        a.set_xticks(range(len(stages)), labels, fontsize=8)
        a.set_xlim(-0.5, len(stages) - 0.5)
        a.margins(y=0.35)
        a.tick_params(axis="y", labelsize=7)
        a.set_title(EVAL_TITLES.get(name, name), fontsize=9)
    fig.tight_layout()
    atomic_write_bytes(Path(out_png), lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return {"eval": evals, "kept": kept}
