"""A trained AEGAN as one Python object::

    import aegan_fast
    model = aegan_fast.load("runs/20261207-demo-r64")        # a run directory or a checkpoint file
    images = model.sample(seeds=range(16), truncation=0.8)    # N×3×R×R in [-1, 1]; pil=True for PIL images
    emb = model.encode(["me.jpg", "you.png"])                 # real images → embeddings H(x), no optimisation
    again = model.decode(emb)                                 # embeddings → images, F then φ
    walk = model.interpolate([1, 7, 42], frames=30)           # seeds, images or projections as keyframes
    fit = model.project("me.jpg")                             # the z whose G_E(z) is nearest H(x)
    walk = model.interpolate([fit, 42], frames=30)            # a real image walks to a seed, in z

The sampling chain is z → G_E → F → φ. AEGAN's encoder H maps a real image straight into the embedding
that G_E generates, so encoding, reconstructing and interpolating real images need no optimisation;
only ``project`` (finding a z for an image) runs one, on the small R/16 × R/16 × 64 embedding rather
than on pixels.

``sample`` and z-space interpolation run on the ``Sampler`` (``backend="auto"``: the fastest that runs
here; the same image per seed on every backend); the embedding-space work (encode, decode,
reconstruct, embedding interpolation, project) runs the run's nets in PyTorch on ``device``. Images
are float32 N×3×R×R in [-1, 1] on the CPU, or PIL images with ``pil=True``. Real images may be file
paths (prepared exactly as training prepares a folder: ``data.read_images``), PIL images, uint8
N×3×R×R / 3×R×R tensors or float tensors in [-1, 1]. The CLIs ``sample``, ``interpolate``,
``encode``, ``decode``, ``reconstruct`` and ``project`` are thin layers over this class.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .data import read_images, to_float, to_uint8
from .device import pick_device
from .errors import UserError
from .interpolation import SPACES, default_method, path
from .metrics import psnr
from .models import check_truncation, per_seed_z, run_in_chunks, truncate
from .training.run_state import load_sampling_nets

log = logging.getLogger("aegan_fast")

ImageLike = Union[str, Path, Image.Image, torch.Tensor, np.ndarray]


@dataclass
class Reconstruction:
    """``reconstruct``'s answer: the inputs x, F(H(x)), φ(F(H(x))) (None without a denoiser) and the
    PSNR (dB, images in [-1, 1]) of each image's final output against its input."""
    inputs: torch.Tensor
    decoded: torch.Tensor
    denoised: torch.Tensor | None
    psnr: list[float]
    names: list[str] = field(default_factory=list)

    @property
    def output(self) -> torch.Tensor:
        return self.decoded if self.denoised is None else self.denoised


@dataclass
class Projection:
    """``project``'s answer: the z (1 × z_dim, in [-1, 1]) whose G_E(z) is nearest the image's H(x),
    the mean squared embedding distance after each step (``loss``), and the target H(x)."""
    z: torch.Tensor
    loss: list[float]
    target: torch.Tensor
    name: str = ""

    @property
    def final_loss(self) -> float:
        return self.loss[-1]


def load(path: str | Path, device: str | torch.device = "auto", *, backend: str = "auto",
         precision: str = "auto", use_ema: bool = True) -> "TrainedModel":
    """The trained model in ``path`` (a run directory, its latest checkpoint or its sampling default,
    or a checkpoint file). ``backend`` / ``precision``: the Sampler's (``sample`` and z-space
    interpolation); ``use_ema``: the EMA weights where the run kept them."""
    return TrainedModel(path, device, backend=backend, precision=precision, use_ema=use_ema)


class TrainedModel:
    """The nets of one trained run and everything people do with them (module docstring)."""

    def __init__(self, path: str | Path, device: str | torch.device = "auto", *, backend: str = "auto",
                 precision: str = "auto", use_ema: bool = True):
        self.path = Path(path).expanduser()
        self.device = pick_device(str(device))
        self.cfg, self.nets = load_sampling_nets(self.path, self.device, use_ema=use_ema)
        self.nets.requires_grad_(False)
        self.resolution, self.z_dim = self.cfg.model.resolution, self.cfg.model.z_dim
        self.has_denoiser = bool(self.cfg.model.denoiser)
        self._sampler_args = dict(backend=backend, device=self.device, precision=precision, use_ema=use_ema)
        self._sampler = None

    def __repr__(self) -> str:
        return (f"TrainedModel({str(self.path)!r}, R={self.resolution}, z_dim={self.z_dim}, "
                f"denoiser={self.has_denoiser}, device={self.device})")

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        e = self.cfg.model.embed_size
        return (self.cfg.model.embed_channels, e, e)

    @property
    def sampler(self):
        """The Sampler that ``sample`` and z-space interpolation run on, loaded on first use."""
        if self._sampler is None:
            from .sampling import Sampler
            self._sampler = Sampler.load(self.path, **self._sampler_args)
        return self._sampler

    # ---- z → images ---------------------------------------------------------------------------
    def sample(self, seeds: Sequence[int] | None = None, *, n: int | None = None, seed: int = 0,
               truncation: float = 1.0, batch: int = 64, progress: bool = False, pil: bool = False):
        """One image per seed of ``seeds`` (the same image as ``python -m aegan_fast.sample --seeds``
        on any backend), or ``n`` images drawn for ``seed``; z truncated by ψ = ``truncation``."""
        if seeds is None and n is None:
            raise UserError("give seeds=[...] or n=")
        images = self.sampler.sample(n, seed, batch, progress, seeds=seeds, truncation=truncation)
        return to_pil(images) if pil else images

    def generate_embedding(self, z: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """G_E(z): the embeddings the sampling chain decodes (N × C × R/16 × R/16, on the CPU)."""
        return self._run("G_E", self._check_z(z), batch)

    def _run(self, net: str, x: torch.Tensor, batch: int, progress: bool = False) -> torch.Tensor:
        """One of the nets over x in chunks of ``batch`` on the model's device, back on the CPU in fp32."""
        if len(x) == 0:  # no chunks: the net's own empty answer, with its shape
            with torch.no_grad():
                return self.nets[net](x.to(self.device)).float().cpu()
        return run_in_chunks(lambda chunk: self.nets[net](chunk.to(self.device)).float(), x, batch, progress)

    # ---- real images ↔ embeddings -------------------------------------------------------------
    def images(self, images: ImageLike | Sequence[ImageLike], fit: str = "crop") -> tuple[torch.Tensor, list[str]]:
        """(float N×3×R×R in [-1, 1], names): real images in any accepted form, prepared as training
        prepares them. A file that cannot be used is a UserError naming it."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        out, names = [], []
        for i, item in enumerate(items):
            if isinstance(item, (str, Path)):
                read = read_images([item], self.resolution, fit)
                if read.failed:
                    raise UserError(f"cannot use {read.failure_report()}")
                out.append(to_float(read.images))
                names.extend(Path(n).name for n in read.names)
                continue
            if isinstance(item, Image.Image):
                from .data.images import square, to_rgb
                item = torch.from_numpy(np.array(square(to_rgb(item), self.resolution, fit))).permute(2, 0, 1)
            elif isinstance(item, np.ndarray):
                item = torch.from_numpy(item)
            if not isinstance(item, torch.Tensor):
                raise UserError(f"image {i}: expected a path, a PIL image or a tensor, got {type(item).__name__}")
            x = item if item.dim() == 4 else item[None]
            if x.dim() != 4 or tuple(x.shape[1:]) != (3, self.resolution, self.resolution):
                raise UserError(f"image {i}: expected 3×{self.resolution}×{self.resolution} (or N×3×…) pixels, "
                                f"got {tuple(item.shape)}; pass a file or PIL image to have it cropped and resized")
            out.append(to_float(x) if x.dtype == torch.uint8 else x.float().cpu())
            names.extend(f"image{i}" + (f"-{k}" if len(x) > 1 else "") for k in range(len(x)))
        return torch.cat(out), names

    def encode(self, images: ImageLike | Sequence[ImageLike], *, fit: str = "crop", batch: int = 64) -> torch.Tensor:
        """H(x): each real image's embedding (N × C × R/16 × R/16, on the CPU)."""
        return self._run("H", self.images(images, fit)[0], batch)

    def decode(self, embeddings: torch.Tensor, *, denoise: bool = True, batch: int = 64, progress: bool = False,
               pil: bool = False):
        """Embeddings → images: F, then φ where the run has one and ``denoise``."""
        images = self._run("F", self._check_embeddings(embeddings), batch, progress)
        if denoise and self.has_denoiser:
            images = self._run("phi", images, batch)
        return to_pil(images) if pil else images

    def reconstruct(self, images: ImageLike | Sequence[ImageLike], *, fit: str = "crop", batch: int = 64) -> Reconstruction:
        """x, F(H(x)) and φ(F(H(x))), with each output's PSNR against x."""
        x, names = self.images(images, fit)
        decoded = self.decode(self._run("H", x, batch), denoise=False, batch=batch)
        denoised = self._run("phi", decoded, batch) if self.has_denoiser else None
        out = decoded if denoised is None else denoised
        return Reconstruction(x, decoded, denoised, psnr(out, x, reduction="none").tolist(), names)

    # ---- walks ------------------------------------------------------------------------------
    def interpolate(self, keys: Sequence, frames: int = 30, *, space: str = "auto", method: str = "auto",
                    loop: bool = False, truncation: float = 1.0, batch: int = 32, progress: bool = False,
                    pil: bool = False, project_steps: int = 300):
        """Frames of a walk through ``keys``: seeds (int), real images (paths, PIL images, tensors) or
        ``Projection``s. ``frames`` per segment, (K − 1) · frames + 1 in all (K · frames with ``loop``).

        ``space``: "z" (through G_E, on the Sampler; images are ``project``ed first), "embedding"
        (G_E(z) of seeds and H(x) of images, decoded by F and φ), or "auto": z when every key is a seed
        or a projection, else the embedding. ``method``: lerp, slerp or auto (slerp in z, lerp in the
        embedding: aegan_fast.interpolation says why)."""
        space, points = self.walk_points(keys, frames, space=space, method=method, loop=loop,
                                         truncation=truncation, project_steps=project_steps)
        chunks = range(0, len(points), batch)
        images = torch.cat([self.render(space, points[i:i + batch], batch) for i in
                            tqdm(chunks, desc="rendering", unit="batch", disable=not progress or len(chunks) < 2)])
        return to_pil(images) if pil else images

    def walk_points(self, keys: Sequence, frames: int = 30, *, space: str = "auto", method: str = "auto",
                    loop: bool = False, truncation: float = 1.0, project_steps: int = 300):
        """(space, the walk's points: z rows or embeddings) for ``interpolate``'s arguments; render
        them in chunks with ``render`` (what the interpolate CLI does to stream a long video)."""
        keys = list(keys)
        check_truncation(truncation)
        if space == "auto":
            space = "z" if all(_is_seed(k) or isinstance(k, Projection) for k in keys) else "embedding"
        if space not in SPACES:
            raise UserError(f"unknown interpolation space {space!r}; expected auto, {', '.join(SPACES)}")
        method = default_method(space) if method == "auto" else method
        if space == "z":
            points = path(torch.cat([self._key_z(k, project_steps) for k in keys]), frames, method, loop)
            return space, truncate(points.clamp(-1, 1).float(), truncation)
        if truncation != 1:
            raise UserError("truncation applies to z; in the embedding space it has no meaning (use space='z')")
        return space, path(torch.cat([self._key_embedding(k) for k in keys]), frames, method, loop)

    def render(self, space: str, points: torch.Tensor, batch: int = 32) -> torch.Tensor:
        """Images of walk points: z through the Sampler, embeddings through F (and φ)."""
        return self.sample_z(points, batch) if space == "z" else self.decode(points, batch=batch)

    def sample_z(self, z: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """Images of given z rows (N × z_dim in [-1, 1]) on the Sampler."""
        return run_in_chunks(self.sampler, self._check_z(z), batch)

    def _key_z(self, key, project_steps: int) -> torch.Tensor:
        if isinstance(key, Projection):
            return key.z.cpu()
        if _is_seed(key):
            return per_seed_z([int(key)], self.z_dim)
        log.info("projecting keyframe %s into z (%d steps)", key if isinstance(key, (str, Path)) else "image",
                 project_steps)
        return self.project(key, steps=project_steps).z

    def _key_embedding(self, key) -> torch.Tensor:
        if isinstance(key, Projection):
            return self.generate_embedding(key.z)
        if _is_seed(key):
            return self.generate_embedding(per_seed_z([int(key)], self.z_dim))
        e = self.encode(key)
        if len(e) != 1:
            raise UserError(f"a keyframe is one image, got {len(e)}")
        return e

    # ---- an image → z ------------------------------------------------------------------------
    def project(self, image: ImageLike, *, steps: int = 300, lr: float = 0.05, restarts: int = 8, seed: int = 0,
                progress: bool = False) -> Projection:
        """The z in [-1, 1]^d whose G_E(z) is nearest H(x) (mean squared distance over the embedding):
        Adam from ``restarts`` seeded starts at once (seed, seed + 1, …), z clamped to the cube after
        every step, the best start kept. Cheap: the target is R/16 × R/16 × 64 numbers, not pixels."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise UserError(f"projection steps must be an integer ≥ 1, got {steps!r}")
        if restarts < 1 or not lr > 0:
            raise UserError(f"projection needs restarts ≥ 1 and lr > 0, got {restarts} and {lr}")
        x, names = self.images(image)
        if len(x) != 1:
            raise UserError(f"project takes one image at a time, got {len(x)}")
        target = self._run("H", x, 1).to(self.device)
        G_E = self.nets["G_E"]
        z = per_seed_z(range(seed, seed + restarts), self.z_dim, self.device).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        curves = []
        for _ in tqdm(range(steps), desc="projecting", unit="step", disable=not progress):
            per_start = (G_E(z) - target).pow(2).flatten(1).mean(1)
            opt.zero_grad(set_to_none=True)
            per_start.sum().backward()
            opt.step()
            with torch.no_grad():
                z.clamp_(-1, 1)
            curves.append(per_start.detach().cpu())
        with torch.no_grad():
            final = (G_E(z) - target).pow(2).flatten(1).mean(1).cpu()
        best = int(final.argmin())
        loss = [float(c[best]) for c in curves[1:]] + [float(final[best])]
        return Projection(z[best:best + 1].detach().cpu(), loss, target.cpu(), names[0])

    # ---- checks --------------------------------------------------------------------------------
    def _check_z(self, z) -> torch.Tensor:
        z = torch.as_tensor(z, dtype=torch.float32)
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise UserError(f"z must be N × {self.z_dim}, got {tuple(z.shape)}")
        return z

    def _check_embeddings(self, e) -> torch.Tensor:
        e = torch.as_tensor(e, dtype=torch.float32)
        if e.dim() == 3:
            e = e[None]
        if e.dim() != 4 or tuple(e.shape[1:]) != self.embedding_shape:
            raise UserError(f"embeddings must be N × {' × '.join(map(str, self.embedding_shape))} for this model "
                            f"(R={self.resolution}), got {tuple(e.shape)}")
        return e


def _is_seed(key) -> bool:
    return isinstance(key, (int, np.integer)) and not isinstance(key, bool)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """float N×3×H×W in [-1, 1] → PIL RGB images."""
    return [Image.fromarray(a) for a in to_uint8(images).permute(0, 2, 3, 1).numpy()]
