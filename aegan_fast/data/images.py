"""Decoding real-world images robustly, and listing them in a folder or an archive.

Every source file becomes either one uint8 R×R×3 RGB array or a one-line reason why not. Nothing a
user can put in a folder (truncated or empty files, text named .png, 16-bit or CMYK images,
decompression bombs, symlink loops) raises out of this module.

Conversion to RGB:
- an embedded ICC profile (Adobe RGB, Display P3, CMYK) is converted to sRGB with LittleCMS; without
  one CMYK goes through Pillow's plain conversion;
- 16-bit and 32-bit grayscale (Pillow modes I;16*, I, F) are scaled to 8 bits, not clipped
  (65535 → 255); palette and grayscale images are expanded; EXIF orientation is applied;
- transparency (RGBA, LA, PA, premultiplied modes, palette or grayscale with a transparent colour)
  is composited onto ``background`` (white by default) with straight-alpha "over".

Geometry: centre-crop to a square (``fit="crop"``) or pad to one with the background (``"pad"``),
then resize to R×R with Pillow's Lanczos filter (a = 3, its support widened by the scale factor
when reducing, so it is an antialiased downscale), with ``reducing_gap=3`` (an exact box reduction
first only where the image is over 3× the target). Large JPEGs are first decoded by libjpeg at a
reduced DCT scale (``draft``) no smaller than 2× the target, which is both faster and at least as good.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import tarfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MAX_FILE_BYTES = 1 << 30   # a single source file larger than this is skipped (an archive bomb guard)
FITS = ("crop", "pad")
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}

_srgb = None
_srgb_lock = threading.Lock()


class Skip(Exception):
    """A source file that cannot be used; the message is the reason written to the manifest."""


def _srgb_profile():
    global _srgb
    with _srgb_lock:
        if _srgb is None:
            _srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        return _srgb


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """High-bit-depth grayscale to 8 bits by scaling (Pillow's convert would clip at 255)."""
    a = np.asarray(im, dtype=np.float64)
    if im.mode in SIXTEEN_BIT or (im.mode == "I" and a.size and a.max() > 255):
        a = a / 257.0
    elif im.mode == "F" and a.size and a.max() <= 1.0:
        a = a * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _apply_icc(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "CMYK"):
        return im
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(im, src, _srgb_profile(), outputMode="RGB")
    except Exception:  # a broken or unsupported profile: fall back to the plain conversion
        return im


def to_rgb(im: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Any Pillow image as 8-bit RGB (see the module docstring for the rules)."""
    transparent = im.info.get("transparency") is not None
    if im.mode in SIXTEEN_BIT or im.mode in ("I", "F"):
        im = _to_8bit_gray(im)
        transparent = False
    if im.mode == "P" and transparent or im.mode in ALPHA_MODES or (im.mode in ("L", "RGB") and transparent):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, tuple(background) + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    im = _apply_icc(im)
    return im if im.mode == "RGB" else im.convert("RGB")


def square(im: Image.Image, resolution: int, fit: str = "crop", background=(255, 255, 255)) -> Image.Image:
    """Centre-crop (or pad) to a square, then Lanczos-resize to resolution²."""
    w, h = im.size
    if fit == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
    else:
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), tuple(background))
        canvas.paste(im, ((side - w) // 2, (side - h) // 2))
        im = canvas
    if side != resolution:
        im = im.resize((resolution, resolution), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return im


def decode(data: bytes, resolution: int, fit: str = "crop", background=(255, 255, 255),
           min_side: int = 0, max_pixels: int | None = None) -> np.ndarray:
    """Encoded bytes to uint8 resolution×resolution×3 RGB, or Skip with the reason."""
    if not data:
        raise Skip("empty file (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if limit and w * h > limit:
                raise Skip(f"over the decompression-bomb limit: {w}×{h} = {w * h} pixels > {limit}")
            if min(w, h) < min_side:
                raise Skip(f"too small: {w}×{h} (shorter side < {min_side}, see --min-side)")
            if im.format == "JPEG":
                scale = 2 * resolution / (min(w, h) if fit == "crop" else max(w, h))
                if scale < 1:
                    im.draft(im.mode, (math.ceil(w * scale), math.ceil(h * scale)))
            im.load()
            im = ImageOps.exif_transpose(im)
            return np.asarray(square(to_rgb(im, background), resolution, fit, background), dtype=np.uint8)
    except Skip:
        raise
    except Image.DecompressionBombError as e:
        raise Skip(f"over the decompression-bomb limit: {e}") from None
    except UnidentifiedImageError:
        raise Skip("not a decodable image (Pillow cannot identify it)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise Skip(f"truncated or corrupt: {type(e).__name__}: {e}".splitlines()[0]) from None
    except Exception as e:  # anything else a broken file can provoke inside a decoder
        raise Skip(f"cannot decode: {type(e).__name__}: {e}".splitlines()[0]) from None


# --------------------------------------------------------------------------- sources

@dataclass
class Entry:
    """One file of a source: its path relative to the source, and how to read it (None when it was
    already found unusable while listing, with ``reason``)."""
    name: str
    size: int
    stamp: str                       # what identifies this version of the file in a listing key
    read: Callable[[], bytes] | None
    reason: str | None = None


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def list_source(src: Path) -> tuple[str, list[Entry]]:
    """(kind, entries) of a folder (recursively, following directory symlinks once) or a zip/tar
    archive. Entries are sorted by name, so the order of a prepared set never depends on the file system."""
    if src.is_dir():
        return "folder", sorted(_walk_folder(src), key=lambda e: e.name)
    if is_archive(src):
        if src.name.lower().endswith(".zip"):
            return "zip", sorted(_list_zip(src), key=lambda e: e.name)
        return "tar", sorted(_list_tar(src), key=lambda e: e.name)
    raise FileNotFoundError(src)


def _walk_folder(root: Path) -> Iterator[Entry]:
    seen: set[tuple[int, int]] = set()
    st = root.stat()
    seen.add((st.st_dev, st.st_ino))
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            children = list(os.scandir(folder))
        except OSError as e:
            yield Entry(str(Path(folder).relative_to(root)) + "/", 0, "", None, f"unreadable folder: {e.strerror}")
            continue
        for child in children:
            rel = str(Path(child.path).relative_to(root))
            try:
                st = os.stat(child.path)  # follows symlinks; a loop raises ELOOP
            except OSError as e:
                kind = "symlink loop" if e.errno == 40 else "broken symlink" if child.is_symlink() else "unreadable"
                yield Entry(rel, 0, "", None, f"{kind}: {e.strerror}")
                continue
            if stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    yield Entry(rel + "/", 0, "", None, "symlink loop: folder already visited")
                else:
                    seen.add((st.st_dev, st.st_ino))
                    stack.append(Path(child.path))
            elif stat.S_ISREG(st.st_mode):
                reason = _skip_reason(rel, st.st_size)
                yield Entry(rel, st.st_size, f"{st.st_size}:{st.st_mtime_ns}",
                            None if reason else (lambda p=child.path: Path(p).read_bytes()), reason)
            else:
                yield Entry(rel, 0, "", None, "not a regular file (device, socket or fifo)")


def _skip_reason(name: str, size: int) -> str | None:
    """Why a listed file is not read at all (wrong type or too large), or None."""
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in IMAGE_SUFFIXES:
        return f"not an image file type ({suffix or 'no suffix'})"
    if size > MAX_FILE_BYTES:
        return f"larger than {MAX_FILE_BYTES} bytes"
    return None


def _list_zip(path: Path) -> Iterator[Entry]:
    zf = zipfile.ZipFile(path)
    yield from _list_members(
        ((info.filename, info.file_size, f"{info.file_size}:{info.CRC}", info,
          "symlink inside the archive (not followed)" if stat.S_ISLNK(info.external_attr >> 16) else None)
         for info in zf.infolist() if not info.is_dir()),
        zf.read)


def _list_tar(path: Path) -> Iterator[Entry]:
    tf = tarfile.open(path)

    def read(member):
        f = tf.extractfile(member)
        return f.read() if f else b""

    yield from _list_members(
        ((m.name, m.size, f"{m.size}:{m.mtime}", m,
          None if m.isfile() else "link or special file inside the archive (not followed)")
         for m in tf.getmembers() if not m.isdir()),
        read)


def _list_members(members, read) -> Iterator[Entry]:
    """Entries of an archive's members, given as (name, size, stamp, member, why not followed or None);
    read(member) → bytes, one at a time (an open archive is not safe to read from several threads)."""
    lock = threading.Lock()

    def reader(member):
        def read_locked():
            with lock:
                return read(member)
        return read_locked

    for name, size, stamp, member, special in members:
        if special:
            yield Entry(name, 0, "", None, special)
            continue
        reason = _skip_reason(name, size)
        yield Entry(name, size, stamp, None if reason else reader(member), reason)


def listing_key(kind: str, entries: list[Entry], *settings) -> str:
    """A hash of what a source holds (names, sizes, modification stamps) and the settings."""
    h = hashlib.sha256(repr((kind, settings)).encode())
    for e in entries:
        h.update(f"{e.name}\0{e.stamp}\0{e.reason or ''}\n".encode())
    return h.hexdigest()[:20]
