"""Differentiable augmentation of a discriminator's inputs (DiffAugment, Zhao et al. 2020; ADA, Karras
et al. 2020): every input of D, real and fake, in its own steps and in the generator's loss, goes
through the same ops with the same strength p, each with its own random draws. Because the fakes are
augmented before D judges them and gradients flow back through the ops, G learns to match the
un-augmented real distribution; with p < 1 an invertible op cannot "leak" into G's samples.

Each op is applied to each sample with probability p (ADA's scheme); p = 1 with the ``diffaugment``
policy is DiffAugment's recipe, p = 0 is the identity bit for bit (``torch.where`` keeps the input).
p lives on the device and is read only through tensor ops: no host sync in a step. The random
parameters come from torch's global RNG, which checkpoints carry, so a resumed run draws the same.

p is fixed, or adaptive (ADA): r_t = E[sign(D(real))] over ``interval`` D steps; p moves up when
r_t is above the target (D is overconfident on reals: overfitting) and down when below, at a speed
that lets it cross 0 → 1 in ``speed_kimg`` thousand real images, clamped to [0, cap]. Under torchrun
r_t is averaged over the ranks, so every rank keeps the same p.

Steps reach a discriminator's pipe through ``pipe_for(D)`` inside ``applied(...)`` (training/stages.py's
``_d_step`` and ``_d_of``); outside it, or for a discriminator without a policy, the pipe is the identity.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.nn.functional as F

from . import distributed


# --------------------------------------------------------------------------- ops
# Each op augments every sample of an NCHW batch with its own random parameters (drawn whether or not
# the sample is then kept, so the RNG stream does not depend on p); Pipe keeps each result with prob. p.

def _uniform(x: torch.Tensor) -> torch.Tensor:
    """One U[0, 1) draw per sample, broadcastable over x, in x's dtype (bf16 steps stay bf16)."""
    return torch.rand(x.shape[0], 1, 1, 1, device=x.device).to(x.dtype)


def brightness(x):
    return x + (_uniform(x) - 0.5)


def saturation(x):
    mean = x.mean(1, keepdim=True)
    return (x - mean) * (2 * _uniform(x)) + mean


def contrast(x):
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(x) + 0.5) + mean


def _shift(x: torch.Tensor, ratio: float, mode: str) -> torch.Tensor:
    """Integer translation by up to ratio × side (at least one cell) per axis, edges filled by
    ``mode`` (F.pad's "constant": zeros, or "reflect"); gathers, not a loop over samples."""
    n, c, h, w = x.shape
    s = max(1, int(h * ratio + 0.5))
    padded = F.pad(x, [s, s, s, s], mode=mode)
    dy, dx = (torch.randint(-s, s + 1, (n, 1), device=x.device) for _ in range(2))
    rows = torch.arange(h, device=x.device) + s - dy
    cols = torch.arange(w, device=x.device) + s - dx
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * s))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def translation(x):
    """DiffAugment's: 1/8 of the side, zero fill."""
    return _shift(x, 1 / 8, "constant")


def translation_reflect(x):
    """ADA's integer translation: 1/8 of the side, reflected edges (no border D could key on)."""
    return _shift(x, 1 / 8, "reflect")


def cutout(x, ratio: float = 0.5):
    """DiffAugment's: a square of half the side zeroed at a random centre (clipped at the edges)."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h + (1 - ch % 2), (n, 1), device=x.device) - ch // 2
    left = torch.randint(0, w + (1 - cw % 2), (n, 1), device=x.device) - cw // 2
    r, c = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    inside = (((r >= top) & (r < top + ch))[:, :, None] & ((c >= left) & (c < left + cw))[:, None, :])
    return x * (~inside)[:, None].to(x.dtype)


def xflip(x):
    """ADA's: a coin per sample picks flipped or not, so applied with probability p a sample is mirrored
    with p/2 ≤ 1/2: mirrored images never outnumber the originals (a generator would copy the majority)."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(3), x)


def rot90(x):
    """A quarter turn k ∈ {0, 1, 2, 3} per sample (square inputs): all four turns, each sample's picked."""
    k = torch.randint(0, 4, (x.shape[0],), device=x.device)
    turns = torch.stack([torch.rot90(x, i, (2, 3)) for i in range(4)])
    return turns[k, torch.arange(x.shape[0], device=x.device)]


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """x resampled (bilinear) through per-sample 2×3 matrices, reflected at the edges as ADA does.
    At least in fp32: the sampling grid's arithmetic is too coarse in bf16."""
    work = torch.promote_types(x.dtype, torch.float32)
    grid = F.affine_grid(theta.to(work), list(x.shape), align_corners=False)
    return F.grid_sample(x.to(work), grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False).to(x.dtype)


def scale(x):
    """ADA's isotropic scaling: a log-normal factor, std 0.2·ln 2."""
    s = torch.exp2(torch.randn(x.shape[0], device=x.device) * 0.2)
    zero = torch.zeros_like(s)
    theta = torch.stack([torch.stack([1 / s, zero, zero], 1), torch.stack([zero, 1 / s, zero], 1)], 1)
    return _affine(x, theta)


def rotation(x):
    """ADA's arbitrary rotation: a uniform angle in [-π, π)."""
    a = (torch.rand(x.shape[0], device=x.device) * 2 - 1) * math.pi
    cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, theta)


OPS = {f.__name__: f for f in (brightness, saturation, contrast, translation, translation_reflect, cutout,
                               xflip, rot90, scale, rotation)}
# Names for the usual sets: DiffAugment's policy, its colour part, and ADA's geometric pipe.
POLICIES = {"diffaugment": ("brightness", "saturation", "contrast", "translation", "cutout"),
            "color": ("brightness", "saturation", "contrast"),
            "geometric": ("xflip", "rot90", "translation_reflect", "scale", "rotation")}
NETS = ("D_E", "D_R")


def parse_policy(text: str) -> tuple[str, ...]:
    """"diffaugment", "translation,cutout", "geometric,color", ... as op names in order; "none" or "" is
    no op. ValueError naming the unknown word."""
    ops: list[str] = []
    for word in filter(None, (w.strip() for w in text.split(","))):
        if word == "none":
            continue
        if word not in OPS and word not in POLICIES:
            raise ValueError(f"unknown augmentation {word!r}; choose ops from {', '.join(OPS)} or policies "
                             f"{', '.join(POLICIES)}, comma-separated")
        ops += [op for op in POLICIES.get(word, (word,)) if op not in ops]
    return tuple(ops)


def parse_p(text) -> float | None:
    """A fixed p in [0, 1], or None for "adaptive"; ValueError otherwise."""
    if str(text) == "adaptive":
        return None
    try:
        p = float(text)
    except ValueError:
        p = math.nan
    if not 0 <= p <= 1:
        raise ValueError(f"must be a probability in [0, 1] or 'adaptive', got {text!r}")
    return p


# --------------------------------------------------------------------------- one discriminator's pipe

class Pipe:
    """A discriminator's augmentation: its ops, applied in order, each kept per sample with
    probability p; and the statistic r_t = E[sign(D(real))] that an adaptive p follows."""

    def __init__(self, ops: tuple[str, ...] = (), p: float | None = 0.0, target: float = 0.6, interval: int = 4,
                 speed_kimg: float = 10.0, cap: float = 1.0, device="cpu"):
        self.ops, self.adaptive = ops, p is None
        self.target, self.interval, self.speed_kimg, self.cap = target, interval, speed_kimg, cap
        device = torch.device(device)
        self.p = torch.tensor(0.0 if p is None else p, device=device)  # ADA starts from no augmentation
        self.signs = torch.zeros((), device=device)   # Σ sign(D(real)) since the last adjustment
        self.rt = torch.zeros((), device=device)      # r_t of the last interval (logged once there is one)
        self.seen = self.images = self.calls = 0       # logits and images since the last adjustment; D steps

    def __bool__(self) -> bool:
        return bool(self.ops)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ops:
            return x
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        keep_shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        for name in self.ops:
            apply = (torch.rand(x.shape[0], device=x.device) < self.p).view(keep_shape)
            x = torch.where(apply, OPS[name](x), x)
        # the steps' layout (precision.py): the gathers return the default one
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    @torch.no_grad()
    def observe(self, real_logits: torch.Tensor) -> None:
        """Count D's verdicts on (augmented) reals; every ``interval`` calls, r_t over them and, when
        adaptive, p one step towards the target. Tensor ops only (one all-reduce under torchrun)."""
        if not self.ops:
            return
        self.signs += real_logits.float().sign().sum()
        self.seen += real_logits.numel()
        self.images += real_logits.shape[0]
        self.calls += 1
        if self.calls % self.interval:
            return
        self.rt = distributed.mean_over_ranks(self.signs / self.seen)  # every rank the same r_t, so the same p
        if self.adaptive:
            step = self.images * distributed.current().size / (self.speed_kimg * 1000)
            self.p = (self.p + torch.sign(self.rt - self.target) * step).clamp(0.0, self.cap)
        self.signs = torch.zeros_like(self.signs)
        self.seen = self.images = 0

    def state_dict(self) -> dict:
        return {"p": self.p, "signs": self.signs, "rt": self.rt, "seen": self.seen, "images": self.images,
                "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        device = self.p.device
        self.p, self.signs, self.rt = (state[k].to(device) for k in ("p", "signs", "rt"))
        self.seen, self.images, self.calls = state["seen"], state["images"], state["calls"]


IDENTITY = Pipe()


def from_config(cfg, device) -> dict[str, Pipe]:
    """{discriminator: Pipe} of a TrainConfig's augment fields (empty when augmentation is off).
    ValueError on a bad policy or p (training/validate.py turns it into a UserError)."""
    p = parse_p(cfg.augment_p)
    return {name: Pipe(parse_policy(text), p, cfg.augment_target, cfg.augment_interval, cfg.augment_speed_kimg,
                       cfg.augment_cap, device)
            for name, text in cfg.augment.items() if parse_policy(text)}


def state_dict(pipes: dict[str, Pipe]) -> dict:
    return {name: pipe.state_dict() for name, pipe in pipes.items()}


def load_state_dict(pipes: dict[str, Pipe], state: dict | None) -> None:
    for name, pipe_state in (state or {}).items():
        if name in pipes:
            pipes[name].load_state_dict(pipe_state)


def log_row(pipes: dict[str, Pipe], nets) -> dict:
    """{"aug_p": {D: p}, "aug_rt": {D: r_t or None}} for the pipes of ``nets`` (a stage's trained nets);
    {} when none: a run without augmentation logs what it always did. One host sync (the trainer's log)."""
    mine = {name: pipe for name, pipe in pipes.items() if name in nets}
    if not mine:
        return {}
    return {"aug_p": {name: pipe.p.item() for name, pipe in mine.items()},
            "aug_rt": {name: pipe.rt.item() if pipe.calls >= pipe.interval else None for name, pipe in mine.items()}}


# --------------------------------------------------------------------------- the steps' view

_active: contextvars.ContextVar[dict] = contextvars.ContextVar("augment_pipes", default={})


@contextlib.contextmanager
def applied(pipes: dict[str, Pipe], nets):
    """Inside: each discriminator module of ``nets`` named in ``pipes`` has its pipe (pipe_for)."""
    token = _active.set({id(nets[name]): pipe for name, pipe in pipes.items() if name in nets})
    try:
        yield
    finally:
        _active.reset(token)


def pipe_for(D) -> Pipe:
    return _active.get().get(id(D), IDENTITY)
