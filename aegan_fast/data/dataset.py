"""Training images as one uint8 N×3×R×R tensor: the built-in emoji set, a raw folder or archive
(prepared on the fly into the cache, keyed by its contents and R), or a prepared data set.

3,391 emoji at R=64 take 42 MB, so a batch is an index, a flip and a cast, and the trainer never
waits on decoding. Sets larger than ``cache_mb`` stay memory-mapped instead of read into RAM.

A prepared set's last ``holdout`` images are held out for scoring (prepare.py says which):
``split("train")`` is what the trainer reads, ``reference()`` what every score compares with.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .images import IMAGE_SUFFIXES, Skip, decode, is_archive, list_source, listing_key
from .prepare import is_prepared, prepare, read_manifest

log = logging.getLogger("aegan_fast.data")

EMOJI_PACKAGE = "@lobehub/fluent-emoji-3d@1.1.0"
EMOJI_TARBALL = "lobehub-fluent-emoji-3d-1.1.0.tgz"
EMOJI_INTEGRITY = ("sha512-Wlq2lVStTnr8BDpIJ0pEnTKO4LuDxxqTEhTvRtD1DLRF0me7ogeRQjKoehDHXuVJ2Qaecgl5wRBv60lUAG3h7g==")


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


SPLITS = ("all", "train", "heldout")
_SPLIT_NAMES = {"train": "training split", "heldout": "held-out split"}
_warned_no_holdout: set[str] = set()


class ImageSet:
    """A decoded image set (uint8, in RAM or memory-mapped), or one split of it. The trainer reads
    it through a loader (loaders.py); ``sample_indices``/``gather`` serve the stage code's own draws
    (as floats in [-1, 1]) and ``spread`` fixed evaluation images.

    ``holdout``: how many of the last images are held out for scoring. ``images`` is this view's
    rows ``start:stop`` of the whole set's array (a view, no copy); indices are into the view."""

    def __init__(self, images: torch.Tensor, source: str, skipped: int = 0, root: Path | None = None,
                 manifest: dict | None = None, in_ram: bool = True, holdout: int = 0):
        if not 0 <= holdout < max(len(images), 1):
            raise ValueError(f"holdout must leave a training image: {holdout} of {len(images)} held out")
        self.whole = images       # uint8 N×3×R×R, in RAM or memory-mapped: every split's rows
        self.images = images      # this view's rows
        self.origin = source      # what the whole set came from
        self.skipped = skipped
        self.root = root          # the prepared data set's folder, when there is one (DALI reads its files)
        self.manifest = manifest
        self.in_ram = in_ram
        self.holdout = holdout
        self.part, self.start, self.stop = "all", 0, len(images)

    @property
    def source(self) -> str:
        return self.origin if self.part == "all" else f"{self.origin} ({_SPLIT_NAMES[self.part]})"

    @source.setter
    def source(self, value: str) -> None:
        self.origin = value

    def split(self, name: str) -> "ImageSet":
        """The "train" rows, the "heldout" rows or "all" of the whole set, as a view (from any view)."""
        n = len(self.whole)
        rows = {"all": (0, n), "train": (0, n - self.holdout), "heldout": (n - self.holdout, n)}
        if name not in rows:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        if name == "heldout" and not self.holdout:
            raise UserError(f"{self.origin} has no held-out images (prepared with --holdout 0, with fewer than 100 "
                            f"images, or before held-out splits existed); prepare it with `python -m aegan_fast.data "
                            f"prepare --holdout K`")
        view = copy.copy(self)
        view.part, (view.start, view.stop) = name, rows[name]
        view.images = self.whole[view.start:view.stop]
        return view

    def reference(self) -> "ImageSet":
        """The real images scores compare with: the held-out split, or, when the set has none, all of
        it (warned once per set: such scores are against training images and reward memorisation)."""
        if self.holdout:
            return self.split("heldout")
        if self.origin not in _warned_no_holdout:
            _warned_no_holdout.add(self.origin)
            log.warning("WARNING: %s has no held-out images: scores compare with training images, so "
                        "memorising them scores well (prepare it with --holdout K to hold some out)", self.origin)
        return self.split("all")

    def describe(self) -> str:
        """How the whole set splits, for log lines and reports."""
        n = len(self.whole)
        if not self.holdout:
            return f"{n} images, all {n} train (none held out: scores are against training images)"
        return f"{n} images, {n - self.holdout} train / {self.holdout} held out for scoring"

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
        return to_float(flip_where(self.images[idx], mirror).to(device, non_blocking=True))

    def spread(self, n: int, device) -> torch.Tensor:
        """n images evenly spaced through the set (repeating when it is smaller): fixed real images
        for reconstruction grids that show its variety, not its first folder."""
        idx = torch.linspace(0, len(self) - 1, n).round().long()
        return to_float(self.images[idx].to(device))


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [0, 255] → float32 in [-1, 1], the range the nets see."""
    return x_uint8.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → uint8 pixels [0, 255], clamped and rounded."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def flip_where(x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """x (N × C × H × W) with the images whose flag (N bools) is set mirrored left–right."""
    return torch.where(flags[:, None, None, None], x.flip(-1), x)


def open_prepared(path: Path, cache_mb: float = 4096) -> ImageSet:
    """A prepared data set: read into RAM when its images.npy fits ``cache_mb``, else memory-mapped
    (pages come from the OS page cache; the loader's worker threads absorb the faults)."""
    manifest = read_manifest(path)
    if manifest is None:
        if (path / ".partial").exists():
            raise UserError(f"{path} is an interrupted preparation, not a data set; run "
                            f"`python -m aegan_fast.data prepare` again to finish it")
        raise UserError(f"{path} is not a prepared data set (no complete manifest.json)")
    npy = path / "images.npy"
    n, r = manifest["count"], manifest["resolution"]
    mapped = np.load(npy, mmap_mode="c")  # copy-on-write: writable for torch, never written back
    if mapped.shape != (n, 3, r, r) or mapped.dtype != np.uint8:
        raise UserError(f"{npy} holds {mapped.shape} {mapped.dtype}, the manifest says {n}×3×{r}×{r} uint8")
    holdout = manifest.get("holdout", 0)  # a set prepared before the split holds none out
    if isinstance(holdout, bool) or not isinstance(holdout, int) or not 0 <= holdout < max(n, 1):
        raise UserError(f"{path / 'manifest.json'} says {holdout!r} of its {n} images are held out")
    in_ram = mapped.nbytes <= cache_mb * 2 ** 20
    images = torch.from_numpy(np.array(mapped) if in_ram else mapped)  # np.array: one sequential read
    return ImageSet(images, manifest["source"], len(manifest["skipped"]), root=path, manifest=manifest,
                    in_ram=in_ram, holdout=holdout)


def prepared_cache_dir(src: Path, resolution: int, cache: Path | None = None) -> Path:
    """Where a raw folder is prepared on the fly: keyed by its contents (names, sizes, mtimes) and R."""
    kind, entries = list_source(src)
    key = listing_key(kind, entries, resolution, "auto-v2")  # v2: with a held-out split
    return (cache or cache_root()) / "prepared" / f"{src.name}-r{resolution}-{key}"


def load_folder(folder: Path, resolution: int, cache: Path | None = None, threads: int | None = None,
                cache_mb: float = 4096, progress: bool = True) -> ImageSet:
    """Every image under folder (recursively) at resolution, prepared once into the cache."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise UserError(f"data folder {folder} does not exist")
    if not (folder.is_dir() or is_archive(folder)):
        raise UserError(f"--data must be a folder of images, a zip/tar archive or a prepared data set, got {folder}")
    out = prepared_cache_dir(folder, resolution, cache)
    if not is_prepared(out):
        manifest = prepare(folder, out, resolution, encoded="none", workers=threads, progress=progress)
        if manifest["skipped"]:
            log.warning("skipped %d unusable file(s) under %s (reasons in %s)", len(manifest["skipped"]), folder,
                        out / "manifest.json")
    data = open_prepared(out, cache_mb)
    data.source = str(folder)
    return data


def load_dataset(data: str | None, resolution: int, cache: Path | None = None, cache_mb: float = 4096) -> ImageSet:
    """--data: a prepared data set, a raw folder or archive (prepared on the fly), or None for the
    built-in emoji set."""
    if data is None:
        return load_folder(fetch_emoji(cache), resolution, cache, cache_mb=cache_mb)
    path = Path(data).expanduser()
    if (path / "manifest.json").exists() or (path / ".partial" / "plan.json").exists():
        ds = open_prepared(path, cache_mb)
        if ds.resolution != resolution:
            raise UserError(f"{path} was prepared at {ds.resolution}², the model is {resolution}²; "
                            f"prepare it again with --resolution {resolution} or pass the raw folder")
        return ds
    return load_folder(path, resolution, cache, cache_mb=cache_mb)


@dataclass
class ReadImages:
    """``read_images``' answer: the images that decoded (uint8 N×3×R×R), their names, and every file
    that did not with its one-line reason."""
    images: torch.Tensor
    names: list[str]
    failed: list[tuple[str, str]] = field(default_factory=list)

    def failure_report(self) -> str:
        return "; ".join(f"{name}: {why}" for name, why in self.failed)


def read_images(paths, resolution: int, fit: str = "crop") -> ReadImages:
    """Image files (or folders of them, their images in name order) prepared exactly as training
    prepares a folder: images.decode with prepare's defaults (sRGB, EXIF orientation, transparency on
    white, centre ``fit``, Lanczos to R×R). A file that cannot be used is listed in ``failed`` with the
    reason, and the rest still load."""
    files: list[Path] = []
    failed: list[tuple[str, str]] = []
    for p in map(Path, paths):
        p = p.expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                failed.append((str(p), "a folder with no image files"))
            files.extend(found)
        elif not p.exists():
            failed.append((str(p), "no such file"))
        else:
            files.append(p)
    arrays, names = [], []
    for f in files:
        try:
            arrays.append(decode(f.read_bytes(), resolution, fit))
            names.append(str(f))
        except Skip as e:
            failed.append((str(f), str(e)))
        except OSError as e:
            failed.append((str(f), f"cannot read: {e.strerror or e}"))
    images = (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous() if arrays
              else torch.empty(0, 3, resolution, resolution, dtype=torch.uint8))
    return ReadImages(images, names, failed)
