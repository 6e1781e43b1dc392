"""Paths between keyframes: lerp and slerp, in z or in the embedding space.

Which to use where (``default_method``):

- **z space, slerp** (the default there). AEGAN's z is uniform on the cube [-1, 1]^d. Two seeds' z
  are nearly orthogonal in d = 100, so the straight line between them sags toward the mean: at its
  midpoint each coordinate has variance 1/6 instead of 1/3, i.e. the middle frame of every segment is
  a ψ ≈ 0.71 truncation (``models.truncate``) and looks duller than either end. Slerp keeps the norm,
  so every frame is as spread as a real draw; it lets about 9% of the coordinates of a midpoint leave
  the cube G_E was trained on, so the result is clamped back to [-1, 1].
- **embedding space, lerp** (the default there). The embedding is the autoencoder's own R/16 × R/16
  map (tanh-bounded), where H(x) of a real image and G_E(z) of a seed both live; a straight line is a
  path through that map, and F decodes every point of it.
"""
from __future__ import annotations

import torch

from .errors import UserError

METHODS = ("lerp", "slerp")
SPACES = ("z", "embedding")


def default_method(space: str) -> str:
    """slerp in z, lerp in the embedding space (the module docstring says why)."""
    return "slerp" if space == "z" else "lerp"


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """a + t (b − a) for each t: T × a.shape."""
    t = t.to(a.dtype).reshape(-1, *([1] * a.dim()))
    return a + t * (b - a)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of a and b as flat vectors (the norm follows a straight line between
    theirs); lerp where they are (anti)parallel and the great circle is not defined."""
    fa, fb = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = fa.norm(), fb.norm()
    if na == 0 or nb == 0:
        return lerp(a, b, t)
    cos = (fa @ fb / (na * nb)).clamp(-1, 1)
    omega = torch.arccos(cos)
    if omega < 1e-4 or torch.pi - omega < 1e-4:
        return lerp(a, b, t)
    td = t.double().reshape(-1, 1)
    ua, ub = fa / na, fb / nb
    direction = (torch.sin((1 - td) * omega) * ua + torch.sin(td * omega) * ub) / torch.sin(omega)
    norm = (1 - td) * na + td * nb
    return (direction * norm).to(a.dtype).reshape(-1, *a.shape)


def path(keys: torch.Tensor, frames: int, method: str = "lerp", loop: bool = False) -> torch.Tensor:
    """The points of a walk through ``keys`` (K × …): ``frames`` points per segment, starting at each
    key, then the last key (or back to the first with ``loop``): (K − 1) · frames + 1 points, or
    K · frames looped."""
    if method not in METHODS:
        raise UserError(f"unknown interpolation method {method!r}; expected one of {', '.join(METHODS)}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise UserError(f"frames per segment must be an integer ≥ 1, got {frames!r}")
    if len(keys) < 2:
        raise UserError(f"an interpolation needs at least two keyframes, got {len(keys)}")
    stops = list(keys) + ([keys[0]] if loop else [])
    t = torch.arange(frames, dtype=torch.float64) / frames
    step = lerp if method == "lerp" else slerp
    out = [step(a, b, t) for a, b in zip(stops[:-1], stops[1:])]
    if not loop:
        out.append(keys[-1:])
    return torch.cat(out)
