"""Sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al., PGGAN, ICLR 2018, App. D).

The recipe, as PGGAN's evaluation measured it:

* Each image set is decomposed into a Laplacian pyramid with the 5-tap binomial filter
  ``[1, 4, 6, 4, 1] / 16`` (the filter of OpenCV's ``pyrDown``/``pyrUp``), mirror-padded at the
  borders. The levels go from full resolution down to 16 x 16; the coarsest level is the Gaussian
  residual (a 64 x 64 image gives levels 64, 32 and 16).
* From every image, at every level, 128 patches of 7 x 7 pixels are cut at uniformly random positions
  (patches lie fully inside the level). Each patch is a 3 x 7 x 7 = 147-dimensional descriptor.
* The descriptors of one set and one level are normalised per colour channel by that set's own mean and
  standard deviation (over all descriptors and all 49 pixels of the set), as PGGAN does.
* The distance between the two descriptor sets of a level is the sliced Wasserstein-1 distance:
  4 repeats x 128 random unit directions (512 in all); per direction, the sorted projections of both
  sets are compared pointwise and the absolute differences averaged; then averaged over directions
  and repeats. The result is multiplied by 1e3.

So both sets must hold the same number of images. PGGAN fed uint8 images; here the float images are
used as they are (no quantisation): the per-channel normalisation makes the value range irrelevant.

Lower is better. Randomness (patch positions, directions) comes from one ``torch.Generator`` seeded
with ``seed``, so the result is deterministic for a given seed, input and device.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ._common import check_images

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
MIN_RES = 16


def _kernel(x: torch.Tensor, gain: float) -> torch.Tensor:
    k = (_BINOMIAL[:, None] * _BINOMIAL[None, :]).to(x.device, x.dtype) * gain
    return k.expand(x.shape[1], 1, 5, 5)


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """Blur with the 5x5 binomial filter (mirror borders, like scipy's mode='mirror') and keep even pixels."""
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), _kernel(x, 1.0), stride=2, groups=x.shape[1])


def pyr_up(x: torch.Tensor) -> torch.Tensor:
    """Insert zeros between pixels, then blur with 4 x the binomial filter (mirror borders)."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return F.conv2d(F.pad(up, (2, 2, 2, 2), mode="reflect"), _kernel(x, 4.0), groups=c)


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Band-pass levels, finest first; the last entry is the low-pass residual. Sum of pyr_up's = x."""
    pyramid = [x]
    for _ in range(1, levels):
        low = pyr_down(pyramid[-1])
        pyramid[-1] = pyramid[-1] - pyr_up(low)
        pyramid.append(low)
    return pyramid


def reconstruct_laplacian_pyramid(pyramid: list[torch.Tensor]) -> torch.Tensor:
    x = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        x = pyr_up(x) + band
    return x


def pyramid_resolutions(h: int, w: int, min_res: int = MIN_RES) -> list[int]:
    """The level sizes (of the shorter side), finest first, down to ``min_res``: 64 -> [64, 32, 16]."""
    res, out = min(h, w), []
    while res >= min_res:
        out.append(res)
        res //= 2
    return out


def _patch_descriptors(level: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, patch: int) -> torch.Tensor:
    """Cut ``patch x patch`` windows with top-left corners (ys, xs) [N x P]; returns (N*P) x (3*patch*patch)."""
    n = level.shape[0]
    off = torch.arange(patch, device=level.device)
    iy = (ys[:, :, None, None] + off[:, None]).expand(-1, -1, patch, patch)
    ix = (xs[:, :, None, None] + off[None, :]).expand(-1, -1, patch, patch)
    ib = torch.arange(n, device=level.device)[:, None, None, None].expand_as(iy)
    patches = level.permute(0, 2, 3, 1)[ib, iy, ix]          # N x P x patch x patch x C
    return patches.permute(0, 1, 4, 2, 3).reshape(-1, level.shape[1] * patch * patch)  # (c, y, x) order


def _normalise(desc: torch.Tensor, channels: int) -> torch.Tensor:
    """Per-channel standardisation over the whole descriptor set (population std, like numpy)."""
    d = desc.view(desc.shape[0], channels, -1)
    mean = d.mean(dim=(0, 2), keepdim=True)
    std = d.std(dim=(0, 2), keepdim=True, unbiased=False).clamp_min(1e-12)
    return ((d - mean) / std).view_as(desc)


def _sort_rows(x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":  # numpy's sort is about 3x faster than torch.sort on CPU here
        return torch.from_numpy(np.sort(x.contiguous().numpy(), axis=1))
    return torch.sort(x, dim=1).values


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, dir_repeats: int, dirs_per_repeat: int,
                       generator: torch.Generator) -> float:
    """Mean over random unit directions of the 1-D Wasserstein-1 distance between projections of a and b."""
    if a.shape != b.shape:
        raise ValueError(f"descriptor sets differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    results = []
    for _ in range(dir_repeats):
        dirs = torch.randn(a.shape[1], dirs_per_repeat, generator=generator, dtype=torch.float32)
        dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(a.device)
        pa = _sort_rows(dirs.T @ a.T)                                  # direction x descriptor
        pb = _sort_rows(dirs.T @ b.T)
        results.append((pa - pb).abs().mean())
    return float(torch.stack(results).mean())


@torch.no_grad()
def swd(real: torch.Tensor, fake: torch.Tensor, *, seed: int = 0, patch_size: int = 7,
        patches_per_image: int = 128, dir_repeats: int = 4, dirs_per_repeat: int = 128,
        min_res: int = MIN_RES, batch_size: int = 256) -> dict[str, float]:
    """SWD between two image sets, per pyramid level and averaged (x 1e3, lower is better).

    Args:
        real, fake: ``N x 3 x H x W`` float tensors in ``[-1, 1]``, the same N and size. H and W must
            be divisible by ``2 ** (levels - 1)`` and the shorter side at least ``min_res``.
        seed: seeds patch positions and projection directions (deterministic given the seed).
        batch_size: images per pyramid pass (memory only; the result does not depend on it).

    Returns:
        ``{"swd_64": ..., "swd_32": ..., "swd_16": ..., "swd": mean_of_levels}`` (keys named by the
        level's shorter side).

    Memory: the descriptors of one level of both sets are held at once,
    ``2 x N x patches_per_image x 147 x 4`` bytes (about 150 KB per image pair at the finest level).
    """
    real = check_images(real, "real", min_size=min_res)
    fake = check_images(fake, "fake", min_size=min_res)
    if real.shape != fake.shape:
        raise ValueError(f"swd needs two sets of the same shape (as PGGAN): real {tuple(real.shape)} "
                         f"vs fake {tuple(fake.shape)}")
    n, c, h, w = real.shape
    resolutions = pyramid_resolutions(h, w, min_res)
    levels = len(resolutions)
    if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
        raise ValueError(f"swd: {h}x{w} is not divisible by 2**{levels - 1} (needed for {levels} levels)")
    gen = torch.Generator().manual_seed(int(seed))

    def pyramids(x):
        levels_out = [[] for _ in range(levels)]
        for i in range(0, n, batch_size):
            for lod, band in enumerate(laplacian_pyramid(x[i:i + batch_size].float(), levels)):
                levels_out[lod].append(band)
        return [torch.cat(parts) for parts in levels_out]

    pyr = {"real": pyramids(real), "fake": pyramids(fake)}
    out = {}
    for lod, res in enumerate(resolutions):
        desc = {}
        for key in ("real", "fake"):
            band = pyr[key][lod]
            lh, lw = band.shape[2:]
            ys = torch.randint(0, lh - patch_size + 1, (n, patches_per_image), generator=gen).to(band.device)
            xs = torch.randint(0, lw - patch_size + 1, (n, patches_per_image), generator=gen).to(band.device)
            parts = [_patch_descriptors(band[i:i + batch_size], ys[i:i + batch_size], xs[i:i + batch_size],
                                        patch_size) for i in range(0, n, batch_size)]
            desc[key] = _normalise(torch.cat(parts), c)
            pyr[key][lod] = None  # free the level as soon as its patches are cut
        out[f"swd_{res}"] = 1e3 * sliced_wasserstein(desc["real"], desc["fake"], dir_repeats, dirs_per_repeat, gen)
    out["swd"] = sum(out.values()) / len(resolutions)
    return out
