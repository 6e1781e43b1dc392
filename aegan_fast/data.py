"""Training images: the built-in emoji set or any folder of images, decoded once into a uint8 cache.

The whole set is held as one uint8 tensor (N×3×R×R): 3,391 emoji at R=64 take 42 MB, so a batch is
an index, a flip and a cast, and the trainer never waits on decoding. The decoded array is cached on
disk, keyed by the source files (names, sizes, modification times) and R, so a second run starts at
once.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from .errors import UserError

log = logging.getLogger("aegan_fast.data")

EMOJI_PACKAGE = "@lobehub/fluent-emoji-3d@1.1.0"
EMOJI_TARBALL = "lobehub-fluent-emoji-3d-1.1.0.tgz"
EMOJI_INTEGRITY = ("sha512-Wlq2lVStTnr8BDpIJ0pEnTKO4LuDxxqTEhTvRtD1DLRF0me7ogeRQjKoehDHXuVJ2Qaecgl5wRBv60lUAG3h7g==")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def cache_root() -> Path:
    return Path(os.environ.get("AEGAN_CACHE", Path.home() / ".cache" / "aegan_fast"))


def _integrity(path: Path) -> str:
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def fetch_emoji(cache: Path | None = None) -> Path:
    """The Fluent 3D emoji assets folder, fetched once with `npm pack` (pinned version, integrity
    checked against the registry's published sha512) and unpacked into the cache."""
    target = (cache or cache_root()) / "fluent-emoji-3d-1.1.0"
    if (target / ".complete").exists():
        return target / "assets"
    npm = shutil.which("npm")
    if npm is None:
        raise UserError("the built-in emoji data set needs npm to fetch it (install Node.js/npm), "
                        "or pass --data DIR with your own images")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        log.info("fetching %s with npm pack", EMOJI_PACKAGE)
        proc = subprocess.run([npm, "pack", EMOJI_PACKAGE, "--pack-destination", tmp, "--silent"],
                              capture_output=True, text=True)
        tarball = Path(tmp) / EMOJI_TARBALL
        if proc.returncode != 0 or not tarball.exists():
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise UserError(f"npm pack {EMOJI_PACKAGE} failed: {detail[-1] if detail else 'no output'}")
        got = _integrity(tarball)
        if got != EMOJI_INTEGRITY:
            raise UserError(f"{EMOJI_TARBALL} failed its integrity check (got {got[:24]}..., "
                            f"expected {EMOJI_INTEGRITY[:24]}...)")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarball) as tar:
            tar.extractall(unpacked, filter="data")
        if target.exists():
            shutil.rmtree(target)
        os.replace(unpacked / "package", target)
        (target / ".complete").touch()
    return target / "assets"


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_image(path: Path, resolution: int, background=(255, 255, 255)) -> np.ndarray:
    """Decode one image to uint8 HWC RGB at resolution²: alpha flattened onto the background,
    centre-cropped to a square, resized with Lanczos."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            flat = Image.new("RGB", im.size, background)
            flat.paste(im, mask=im.getchannel("A"))
            im = flat
        else:
            im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side))
        if side != resolution:
            im = im.resize((resolution, resolution), Image.Resampling.LANCZOS, reducing_gap=3.0)
        return np.asarray(im, dtype=np.uint8)


class ImageSet:
    """A decoded image set in memory; ``batch`` draws random images as floats in [-1, 1]."""

    def __init__(self, images: torch.Tensor, source: str, skipped: int = 0):
        self.images = images  # uint8 N×3×R×R
        self.source = source
        self.skipped = skipped

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    def sample_indices(self, n: int, generator: torch.Generator, flip: bool = True):
        """n random (index, mirrored) pairs: which images a batch holds and which are flipped."""
        idx = torch.randint(len(self), (n,), generator=generator)
        mirror = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
        return idx, mirror

    def gather(self, idx: torch.Tensor, mirror: torch.Tensor, device) -> torch.Tensor:
        x = self.images[idx]
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        return to_float(x.to(device, non_blocking=True))

    def batch(self, n: int, generator: torch.Generator, device, flip: bool = True) -> torch.Tensor:
        return self.gather(*self.sample_indices(n, generator, flip), device)

    def spread(self, n: int, device) -> torch.Tensor:
        """n images evenly spaced through the set (repeating when it is smaller): fixed real images
        for reconstruction grids that show its variety, not its first folder."""
        idx = torch.linspace(0, len(self) - 1, n).round().long()
        return to_float(self.images[idx].to(device))


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _source_key(files: list[Path], root: Path, resolution: int) -> str:
    h = hashlib.sha256(f"v1 {resolution}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def load_folder(folder: Path, resolution: int, cache: Path | None = None, threads: int | None = None) -> ImageSet:
    """Decode every image under folder (recursively) at resolution, using the on-disk cache."""
    if not folder.exists():
        raise UserError(f"data folder {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"--data must be a folder of images, got the file {folder}")
    files = list_images(folder)
    if not files:
        raise UserError(f"no images (jpg, png, webp, ...) found under {folder}")
    cache_dir = (cache or cache_root()) / "decoded"
    key = _source_key(files, folder, resolution)
    npy, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if npy.exists() and meta.exists():
        info = json.loads(meta.read_text())
        return ImageSet(torch.from_numpy(np.load(npy)), str(folder), info["skipped"])

    def decode(p):
        try:
            return load_image(p, resolution)
        except Exception as e:  # unreadable or corrupt: skipped and counted, never fatal
            log.debug("skipping %s: %s", p, e)
            return None

    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        decoded = list(tqdm(pool.map(decode, files), total=len(files), desc=f"decoding {folder.name} @{resolution}",
                            unit="img", leave=False, mininterval=1.0))
    good = [a for a in decoded if a is not None]
    skipped = len(decoded) - len(good)
    if skipped:
        log.warning("skipped %d unreadable file(s) of %d under %s", skipped, len(files), folder)
    if not good:
        raise UserError(f"none of the {len(files)} image file(s) under {folder} could be decoded")
    array = np.ascontiguousarray(np.stack(good).transpose(0, 3, 1, 2))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = npy.with_suffix(".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, npy)
    meta.write_text(json.dumps({"source": str(folder), "count": len(good), "skipped": skipped,
                                "resolution": resolution}))
    return ImageSet(torch.from_numpy(array), str(folder), skipped)


def load_dataset(data: str | None, resolution: int, cache: Path | None = None) -> ImageSet:
    """--data DIR, or the built-in emoji set when data is None."""
    if data is None:
        return load_folder(fetch_emoji(cache), resolution, cache)
    return load_folder(Path(data).expanduser(), resolution, cache)
