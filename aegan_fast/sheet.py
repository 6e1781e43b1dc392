"""The eval CLI's side-by-side sheet: real images | samples | each sample's nearest training image.

A grid of samples alone cannot tell a GAN that generalises from one that replays its training set;
next to each sample's nearest training image, memorisation is visible. The distances' median is
printed beside a reference (how close real images come to the training set) and a blur control (how
close the same real images come once blurred), so "samples sit closer to training images than real
images do" can be read off, not guessed, and told apart from "samples are soft".

Nearest is by L2 in pixel space at a reduced size (area-averaged to ``NN_SIZE``², mirrors of the
training images included, since the trainer sees them mirrored). It is the honest default: a
near-copy is near in pixels by definition, so nothing hides it, and it needs no weights. A
perceptual feature (e.g. EfficientNet's) would rank "same kind of emoji" higher, which is what
hides near-copies among look-alikes. The reduced size keeps the search cheap and forgives the
one-pixel shifts and high-frequency noise a GAN adds to a copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .data import ImageSet, flip_where, to_float
from .errors import UserError
from .models import SamplingChain
from .viz import make_grid, save_png

NN_SIZE = 32
# The blur control: the same real images area-averaged to this side and scaled back up. In pixel L2 a blur
# sits close to everything, so samples that are merely soft come closer to the training set than sharp
# real images do; only samples closer than this control point to copies.
BLUR_SIDE = 8
COPY_RATIO = 0.9  # samples' median / real images' median under this: "closer than real images"
STATS_N = 256  # images behind each median: 16 shown would give a median too noisy to compare
GAP = 8        # white columns between blocks
PAD = 2        # make_grid's padding
PAD_VALUE = 200  # light grey: cells of white-background images (emoji) stay distinguishable


def _features(x: torch.Tensor, size: int) -> torch.Tensor:
    """N×3×s×s float32: x (uint8, or float in [-1, 1]) in [-1, 1], area-averaged to size² (never up)."""
    x = to_float(x) if x.dtype == torch.uint8 else x.float()
    if x.shape[-1] > size or x.shape[-2] > size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x


@torch.no_grad()
def nearest_training_images(queries: torch.Tensor, train: torch.Tensor, size: int = NN_SIZE, chunk: int = 1024,
                            exclude: torch.Tensor | None = None, mirrors: bool = True, device="cpu"):
    """For each query (N×3×R×R in [-1, 1]) its nearest image in ``train`` (uint8 M×3×R×R, in RAM or
    memory-mapped): (distance, index, mirrored). Distance is the root-mean-square difference per
    value on the 0–1 intensity scale at size² (0: the same picture at that size, 1: black vs white).
    ``train`` is read ``chunk`` images at a time, so memory is N×chunk, never N×M×D. ``exclude[i]``
    (a training index, or -1) is never query i's answer: real images measured against the training
    set they belong to must not find themselves. Ties go to the lowest index, unmirrored first, so
    the answer does not depend on ``chunk``."""
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}")
    if queries.shape[1:] != train.shape[1:]:
        raise ValueError(f"queries are {tuple(queries.shape[1:])}, training images {tuple(train.shape[1:])}")
    if len(train) == 0:
        raise ValueError("no training images to search")
    q = _features(queries, size).flatten(1).to(device)
    q_sq = q.square().sum(1, keepdim=True)
    n = len(q)
    best = torch.full((n,), math.inf, device=device)
    best_idx = torch.zeros(n, dtype=torch.long, device=device)
    best_mirror = torch.zeros(n, dtype=torch.bool, device=device)
    rows = torch.arange(n, device=device)
    if exclude is not None:
        exclude = exclude.to(device)
    for start in range(0, len(train), chunk):
        t = _features(train[start:start + chunk].to(device), size)
        views = [t.flatten(1), t.flip(-1).flatten(1)] if mirrors else [t.flatten(1)]
        # ‖q‖² + ‖t‖² − 2 q·t: one matmul per chunk. Its float32 rounding only reorders candidates
        # that are equal to ~1e-6; the winner's distance is recomputed exactly below.
        d = torch.stack([q_sq + v.square().sum(1) - 2 * q @ v.T for v in views])  # views × N × chunk
        d, view = d.min(0)  # first view wins ties: unmirrored
        if exclude is not None:
            own = exclude - start
            hit = (own >= 0) & (own < len(t))
            d[rows[hit], own[hit]] = math.inf
        d_min, j = d.min(1)  # first (lowest) index wins ties
        better = d_min < best
        best = torch.where(better, d_min, best)
        best_idx = torch.where(better, j + start, best_idx)
        best_mirror = torch.where(better, view[rows, j] == 1, best_mirror)
    if not torch.isfinite(best).all():
        raise ValueError("a query has no training image to compare with (all excluded)")
    best_idx, best_mirror = best_idx.cpu(), best_mirror.cpu()
    found = _features(flip_where(train[best_idx], best_mirror), size).flatten(1)
    dist = (q.cpu().double() - found.double()).square().mean(1).sqrt() / 2
    return dist.float(), best_idx, best_mirror


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


@dataclass
class Sheet:
    image: torch.Tensor                       # uint8 3×H×W
    boxes: list[tuple[int, int, int, int]]    # (left, top, width, height) of each block's grid


def make_sheet(blocks: list[tuple[str, torch.Tensor]], nrow: int | None = None, font_px: int = 12) -> Sheet:
    """Blocks of N×3×R×R images in [-1, 1] side by side, each as a grid under its label lines (the
    label's text, split at newlines). Image i sits at the same place in every block."""
    if not blocks:
        raise ValueError("no blocks")
    font = _font(font_px)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    grids = [make_grid(images, nrow, pad=PAD, pad_value=PAD_VALUE) for _, images in blocks]
    widths, label_h = [], 0
    for (label, _), grid in zip(blocks, grids):
        left, top, right, bottom = probe.multiline_textbbox((0, 0), label, font=font)
        widths.append(max(grid.shape[-1], right + 2 * PAD))  # a label never runs into the next block
        label_h = max(label_h, bottom + 2 * PAD)
    height = label_h + max(g.shape[1] for g in grids)
    width = sum(widths) + GAP * (len(blocks) - 1)
    canvas = torch.full((3, height, width), 255, dtype=torch.uint8)
    boxes, x = [], 0
    for grid, w in zip(grids, widths):
        left = x + (w - grid.shape[-1]) // 2
        canvas[:, label_h:label_h + grid.shape[1], left:left + grid.shape[-1]] = grid
        boxes.append((left, label_h, grid.shape[-1], grid.shape[1]))
        x += w + GAP
    im = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(im)
    x = 0
    for (label, _), w in zip(blocks, widths):
        draw.multiline_text((x + PAD, PAD), label, fill=(0, 0, 0), font=font)
        x += w + GAP
    return Sheet(torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous(), boxes)


@dataclass
class SheetResult:
    path: Path
    n: int
    nearest_median: float     # samples to their nearest training image
    reference_median: float   # real images to their nearest (other) training image
    reference: str            # which real images the reference measured
    shown: list[dict]         # per sample on the sheet: its nearest training image's index, mirrored, distance
    boxes: list[tuple[int, int, int, int]] = ()  # the sheet's blocks (make_sheet)
    blur_median: float = math.nan  # the same real images blurred (BLUR_SIDE) to their nearest training image

    @property
    def ratio(self) -> float:
        return self.nearest_median / self.reference_median if self.reference_median > 0 else math.inf

    def verdict(self) -> str:
        """What the medians can say, in words that follow the numbers."""
        if self.ratio >= COPY_RATIO:
            return ("samples sit about as far from the training images as real images do, or further: "
                    "no sign of copying")
        if math.isfinite(self.blur_median) and self.nearest_median >= self.blur_median:
            return (f"samples sit closer than real images do, but no closer than the same real images blurred "
                    f"({self.blur_median:.4f}): in pixel L2 a blur sits close to everything, so soft samples "
                    f"explain it without any copying")
        return (f"samples sit closer to training images than even blurred real images do "
                f"({self.blur_median:.4f}): look for copies in the sheet's third block")

    def summary(self) -> str:
        return (f"sheet: median distance to the nearest training image: samples {self.nearest_median:.4f}, "
                f"real images {self.reference_median:.4f} ({self.reference}); ratio {self.ratio:.2f}: "
                f"{self.verdict()}")

    def as_json(self) -> dict:
        return {"path": str(self.path), "n": self.n, "nearest_median": round(self.nearest_median, 5),
                "reference_median": round(self.reference_median, 5), "reference": self.reference,
                "blur_median": round(self.blur_median, 5), "verdict": self.verdict(), "shown": self.shown}


def blurred(x: torch.Tensor, side: int = BLUR_SIDE) -> torch.Tensor:
    """x (float N×3×R×R in [-1, 1]) area-averaged to side² and scaled back up bilinearly."""
    small = F.interpolate(x, size=(side, side), mode="area")
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _training_rows(data: ImageSet, train: ImageSet, idx: torch.Tensor) -> torch.Tensor:
    """Each of data's images idx as an index into train when it is one of train's images, else -1.
    One prepared set loaded twice (one folder spelled two ways) counts as the same rows: otherwise its
    training images, taken for held-out ones, would each find itself and the reference would read 0."""
    if data is train:
        return idx.clone()
    if data.root is None or train.root is None or Path(data.root).resolve() != Path(train.root).resolve():
        return torch.full_like(idx, -1)
    rows = data.start + idx
    return torch.where((rows >= train.start) & (rows < train.stop), rows - train.start, -1)


def write_sheet(nets, data: ImageSet, train: ImageSet, n: int, seed: int, path: Path, device="cpu",
                stats_n: int = STATS_N) -> SheetResult:
    """Draw n real images of ``data`` (the scoring reference, seeded), n samples of the nets' sampling
    chain (z for seed) and each sample's nearest image of ``train`` (the training split); write the
    sheet to path. The medians use max(n, stats_n) samples and real images. Real images that are
    training images too (a set without a held-out split) are measured leave-one-out (their nearest
    other training image); held-out ones against the whole training split."""
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    m = max(n, stats_n)
    samples = SamplingChain.of(nets).sample(m, seed)
    real_idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:m]
    if len(real_idx) < n:  # fewer real images than asked to show: repeat them rather than show gaps
        real_idx = real_idx.repeat(math.ceil(n / len(real_idx)))[:n]
    real = data.images[real_idx]
    own = _training_rows(data, train, real_idx)
    if (own >= 0).any() and len(train) < 2:
        raise UserError(f"{train.source} has {len(train)} image: the sheet's leave-one-out reference needs 2")
    queries = torch.cat([samples, to_float(real), blurred(to_float(real))])
    exclude = torch.cat([torch.full((m,), -1), own, own]) if (own >= 0).any() else None
    dist, idx, mirrored = nearest_training_images(queries, train.images, exclude=exclude, device=device)
    nearest = to_float(flip_where(train.images[idx[:n]], mirrored[:n]))
    reference = ("other training images, leave-one-out" if (own >= 0).all() else
                 f"held-out images of {data.origin}" if (own < 0).all() else
                 f"images of {data.origin}, leave-one-out for those that are training images")
    k = len(real)
    result = SheetResult(Path(path), n, dist[:m].median().item(), dist[m:m + k].median().item(), reference,
                         [{"train_index": int(i), "mirrored": bool(f), "distance": round(float(d), 5)}
                          for i, f, d in zip(idx[:n], mirrored[:n], dist[:n])],
                         blur_median=dist[m + k:].median().item())
    sheet = make_sheet([
        (f"real ({n} of {len(data)}, seed {seed})", to_float(real[:n])),
        (f"samples (seed {seed})", samples[:n]),
        (f"nearest training image\nmedian distance {result.nearest_median:.3f} "
         f"(real images: {result.reference_median:.3f})", nearest),
    ])
    save_png(sheet.image, path)
    result.boxes = sheet.boxes
    return result
