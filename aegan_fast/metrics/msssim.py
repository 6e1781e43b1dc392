"""MS-SSIM (Wang, Simoncelli & Bovik 2003) and PGGAN's MS-SSIM diversity score.

Recipe (the one PGGAN's evaluation used, itself the TensorFlow port of Wang's MATLAB code):

* images scaled to ``[0, 255]`` (``max_val = 255``, ``K1 = 0.01``, ``K2 = 0.03``);
* a Gaussian window of 11 x 11, sigma 1.5, applied per colour channel with *valid* convolution
  (no padding); SSIM and contrast-structure (cs) maps are averaged over pixels and channels;
* 5 scales with weights ``(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)``; between scales, 2 x 2 box
  averaging; ``MS-SSIM = prod_{s<5} cs_s ** w_s * ssim_5 ** w_5``, with ssim and cs clipped at 0 first.

Small images. The coarsest of 5 scales is ``H / 16``: 4 x 4 for a 64 x 64 image, smaller than the
11 x 11 window. As the TensorFlow/PGGAN code does, the window shrinks to the image at that scale:
``size = min(11, h, w)`` and ``sigma = 1.5 * size / 11`` (so at 64 x 64 the windows are 11, 11, 11,
8 and 4 pixels, the last two covering the whole image with a single valid position). An even window
is centred between pixels. An odd size at some scale loses its last row/column before the 2 x 2
average. Images must be at least ``2 ** (scales - 1)`` = 16 pixels on each side.

Diversity. ``msssim_diversity(images)`` averages MS-SSIM over disjoint pairs of one set, as PGGAN
does (it paired images 0-1, 2-3, ...). The set is first shuffled with ``seed`` so that sets stored
in a meaningful order (such as emoji sorted by code point, where neighbours are skin-tone variants)
are paired at random. Lower means more diverse; compare with the same score on real data.

At 64 x 64 the two coarsest scales hold a single window each, so the contrast-structure term of one
pair of unrelated images is often negative there and, clipped at 0 as in the recipe, sets that pair's
score to 0. Single-pair scores are therefore noisy; the mean over many pairs is the usable figure
(PGGAN averaged 10,000 pairs; use a few hundred at least).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_images, to_255

WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gaussian_1d(size: int, sigma: float, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def _blur_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian, per channel, 'valid' (output shrinks by len(g) - 1)."""
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def _ssim_cs(a: torch.Tensor, b: torch.Tensor, max_val: float, filter_size: int, filter_sigma: float,
             k1: float, k2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean SSIM and contrast-structure term at one scale."""
    size = min(filter_size, a.shape[2], a.shape[3])
    sigma = size * filter_sigma / filter_size
    g = _gaussian_1d(size, sigma, a.device, a.dtype)
    n, c, h, w = a.shape
    # one convolution pass for the five moments, channels folded into the batch (faster than groups=c)
    stack = torch.stack([a, b, a * a, b * b, a * b]).reshape(5 * n * c, 1, h, w)
    mu_a, mu_b, e_aa, e_bb, e_ab = _blur_valid(stack, g).reshape(5, n, c, h - size + 1, w - size + 1)
    s_aa = e_aa - mu_a * mu_a
    s_bb = e_bb - mu_b * mu_b
    s_ab = e_ab - mu_a * mu_b
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    v1 = 2.0 * s_ab + c2
    v2 = s_aa + s_bb + c2
    ssim = ((2.0 * mu_a * mu_b + c1) * v1) / ((mu_a * mu_a + mu_b * mu_b + c1) * v2)
    return ssim.mean(dim=(1, 2, 3)), (v1 / v2).mean(dim=(1, 2, 3))


def _box_down(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    return F.avg_pool2d(x[:, :, :h, :w], 2)


@torch.no_grad()
def msssim(a: torch.Tensor, b: torch.Tensor, *, weights=WEIGHTS, filter_size: int = 11,
           filter_sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
           reduction: str = "mean"):
    """MS-SSIM between image pairs ``a[i]``, ``b[i]`` (``N x 3 x H x W`` in ``[-1, 1]``).

    Returns a float (``reduction="mean"``) or the per-pair tensor (``"none"``); 1.0 means identical.
    """
    levels = len(weights)
    a = check_images(a, "a", min_size=2 ** (levels - 1))
    b = check_images(b, "b", min_size=2 ** (levels - 1))
    if a.shape != b.shape:
        raise ValueError(f"msssim: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    x, y = to_255(a), to_255(b)
    w = torch.tensor(weights, dtype=torch.float32, device=x.device)
    mcs, ssim = [], None
    for level in range(levels):
        ssim, cs = _ssim_cs(x, y, 255.0, filter_size, filter_sigma, k1, k2)
        mcs.append(cs)
        if level < levels - 1:
            x, y = _box_down(x), _box_down(y)
    # SSIM and CS are ≤ 1 in exact arithmetic; fp32 rounding can put identical images a few ulps
    # above, and a score outside [0, 1] would only be noise.
    mcs_t = torch.stack(mcs[:-1]).clamp(0.0, 1.0)                        # (levels-1) x N
    score = torch.prod(mcs_t ** w[:-1, None], dim=0) * ssim.clamp(0.0, 1.0) ** w[-1]
    if reduction == "none":
        return score
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}")
    return float(score.mean())


@torch.no_grad()
def msssim_diversity(images: torch.Tensor, *, seed: int = 0, max_pairs: int | None = None,
                     shuffle: bool = True, batch_size: int = 256) -> float:
    """Mean MS-SSIM over disjoint random pairs of one set (PGGAN's diversity score; lower = more diverse).

    ``images`` is ``N x 3 x H x W`` in ``[-1, 1]`` with N >= 2; ``N // 2`` pairs are scored (at most
    ``max_pairs``). ``shuffle=False`` pairs 0-1, 2-3, ... exactly as PGGAN did.
    """
    images = check_images(images, "images")
    n = images.shape[0]
    if n < 2:
        raise ValueError("msssim_diversity needs at least 2 images")
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))) if shuffle
             else torch.arange(n)).to(images.device)
    pairs = n // 2 if max_pairs is None else min(n // 2, int(max_pairs))
    first, second = order[0:2 * pairs:2], order[1:2 * pairs:2]
    scores = [msssim(images[first[i:i + batch_size]], images[second[i:i + batch_size]], reduction="none")
              for i in range(0, pairs, batch_size)]
    return float(torch.cat(scores).mean())
