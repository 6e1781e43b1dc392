"""Prepare a data set: ``python -m aegan_fast.data prepare SRC OUT --resolution R``.

A prepared data set is a folder:

    manifest.json   written last, atomically: its presence (with "complete": true) is what makes the
                    folder a data set. Count, resolution, settings, one record per image (source
                    name, sha256 of the source bytes, original size and mode) and one per skipped
                    file with its reason; "holdout": how many of the images are held out for scoring.
    images.npy      every image as one uint8 array N×3×R×R (C-contiguous): the torch loader memory-maps
                    it or reads it into RAM in one go, and a batch is an index gather, no decoding.
                    The held-out images are its last k rows, so both splits are slices (views).
    files/          optional: the same images encoded one per file (000000.png, ...), lossless PNG by
                    default or JPEG (--encoded jpeg): DALI's file reader needs encoded files, and its
                    GPU decoder accelerates JPEG only. Written on demand when --loader dali needs them.

Why both: decoding is the expensive part of any loader on a CPU (PNG ≈ 1–2 ms per 256² image per
core), while gathering from a uint8 array costs a memory copy; so the array is the primary format.
Encoded files exist for DALI, whose value is GPU decoding of sets too large for RAM.

Held-out split (``--holdout K``, default auto = min(1000, ⌊0.3·N⌋) for N ≥ 100, else 0): images
that training never sees, the real images every score compares with, so a model that replays its
training set does not score well. Which ones depends only on their names, never on an RNG: the k
images whose sha256(salt + group name) is smallest, where the group name is the source name with
emoji skin-tone modifiers removed (``1f44d-1f3fd.webp`` → ``1f44d.webp``: the five tones of one emoji
are one picture recoloured, so they fall on the same side; the built-in emoji set has 1,520 such
variants), ties within a group broken by sha256(salt + name). So for a fixed k, adding or removing
one file moves at most one other image across the split, and it never depends on file order.

Interruption: sources are processed in chunks, each written atomically to ``OUT/.partial/``; a re-run
with the same source and settings resumes after the last finished chunk, a re-run with different ones
is refused (``--overwrite`` starts over). Until manifest.json is written the folder is not a data set,
and loaders refuse it, so a crash can never leave a corrupt set that looks complete.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import UserError
from ..files import atomic_write_bytes
from .images import FITS, Entry, Skip, decode, list_source, listing_key

log = logging.getLogger("aegan_fast.data")

FORMAT = "aegan_fast-prepared"
VERSION = 1
CHUNK = 256
ENCODINGS = ("png", "jpeg", "none")
HOLDOUT_SALT = b"aegan_fast-holdout-v1\0"
HOLDOUT_RULE = ("the k images whose sha256(salt + source name without emoji skin-tone modifiers) is smallest "
                "(ties by sha256(salt + source name)), salt 'aegan_fast-holdout-v1\\0'; the last k rows of images.npy")
_SKIN_TONE = re.compile(r"[-_]1f3f[b-f](?=[-_.]|$)", re.IGNORECASE)  # U+1F3FB..1F3FF as hex in a file name


def holdout_count(holdout, n: int) -> int:
    """How many of n usable images ``holdout`` ("auto" or an int K) holds out."""
    if holdout == "auto":
        # 1,000 real images are what FID/KID-style scores need; small sets keep most images for training
        return min(1000, n * 3 // 10) if n >= 100 else 0
    holdout = _check_holdout(holdout)
    if holdout and holdout >= n - 1:
        raise UserError(f"--holdout {holdout} leaves {max(n - holdout, 0)} of {n} usable image(s) to train on; "
                        f"it must be below {n - 1} (0 holds none out)")
    return holdout


def _check_holdout(holdout):
    """holdout as "auto" or a plain int (it goes into JSON), or a clear error."""
    if holdout == "auto":
        return holdout
    if isinstance(holdout, bool) or not isinstance(holdout, (int, np.integer)):
        raise UserError(f"--holdout must be 'auto' or a whole number of images, got {holdout!r}")
    if holdout < 0:
        raise UserError(f"--holdout must be ≥ 0 (0 holds none out), got {holdout}")
    return int(holdout)


def holdout_rank(name: str) -> tuple[bytes, bytes]:
    """The key images are held out by, smallest first (see the module docstring)."""
    group = _SKIN_TONE.sub("", name)
    return (hashlib.sha256(HOLDOUT_SALT + group.encode()).digest(),
            hashlib.sha256(HOLDOUT_SALT + name.encode()).digest())


def holdout_positions(names: list[str], k: int) -> set[int]:
    """Positions in names of the k held-out images (equal names, possible in an archive, tie by position)."""
    return set(sorted(range(len(names)), key=lambda i: (holdout_rank(names[i]), i))[:k])


def _write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_bytes(out / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def read_manifest(out: Path) -> dict | None:
    """The manifest of a complete prepared set, else None."""
    try:
        m = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return m if m.get("format") == FORMAT and m.get("complete") else None


def is_prepared(path: Path) -> bool:
    return path.is_dir() and read_manifest(path) is not None


def _process(entry: Entry, resolution, fit, background, min_side, max_pixels):
    """(record, uint8 HWC array or None) for one source entry."""
    record = {"source": entry.name}
    if entry.read is None:
        record["reason"] = entry.reason
        return record, None
    try:
        data = entry.read()
    except OSError as e:
        record["reason"] = f"unreadable: {e.strerror or e}"
        return record, None
    record["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        array = decode(data, resolution, fit, background, min_side, max_pixels)
    except Skip as e:
        record["reason"] = str(e)
        return record, None
    return record, array


def prepare(src, out, resolution: int, *, fit: str = "crop", background=(255, 255, 255),
            dedup: bool = False, encoded: str = "png", jpeg_quality: int = 95, min_side: int | None = None,
            max_pixels: int | None = None, workers: int | None = None, overwrite: bool = False,
            progress: bool = True, holdout="auto") -> dict:
    """Prepare src (a folder or a zip/tar archive) into out; returns the manifest. Idempotent: an
    already complete set with the same source and settings is returned as is. ``holdout``: "auto"
    or how many images to hold out for scoring (module docstring)."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    from ..models import check_resolution  # lazily: the models pull in the ops backends
    try:  # refused here, before any decoding, rather than by the trainer after hours of it
        check_resolution(resolution)
    except ValueError as e:
        raise UserError(f"--{e}: training could not use a set prepared at {resolution}²") from None
    if fit not in FITS:
        raise UserError(f"--fit must be one of {FITS}")
    if encoded not in ENCODINGS:
        raise UserError(f"--encoded must be one of {ENCODINGS}")
    holdout = _check_holdout(holdout)
    background = tuple(int(c) for c in background)
    if len(background) != 3 or not all(0 <= c <= 255 for c in background):
        raise UserError("--background must be three values 0..255")
    min_side = resolution // 4 if min_side is None else min_side
    max_pixels = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if not src.exists():
        raise UserError(f"{src} does not exist")
    try:
        kind, entries = list_source(src)
    except FileNotFoundError:
        raise UserError(f"{src} is neither a folder nor a zip/tar archive") from None
    except (OSError, EOFError, ValueError) as e:  # zipfile.BadZipFile and tarfile.ReadError are among these
        raise UserError(f"cannot read the archive {src}: {e}") from None
    if not entries:
        raise UserError(f"{src} holds no files")
    readable = sum(e.read is not None for e in entries)
    if holdout != "auto" and readable:  # refused before decoding when even every listed file could not do
        holdout_count(holdout, readable)
    settings = (resolution, fit, background, dedup, min_side, max_pixels, VERSION)
    # The decoded chunks do not depend on the split: an interrupted run resumes with another --holdout
    decode_key = listing_key(kind, entries, *settings)
    key = listing_key(kind, entries, *settings, ("holdout", holdout))
    if kind == "folder" and out.resolve().is_relative_to(src.resolve()):
        raise UserError(f"the output folder {out} must not be inside the source folder {src}")
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out):  # a second preparation of the same OUT (two runs sharing a cache) waits for this one
        return _prepare_locked(src, out, kind, entries, key, decode_key, settings, holdout, encoded, jpeg_quality,
                               workers, overwrite, progress)


@contextmanager
def _lock(out: Path):
    with open(out / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process preparing %s", out)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepare_locked(src, out, kind, entries, key, decode_key, settings, holdout, encoded, jpeg_quality, workers,
                    overwrite, progress):
    resolution, fit, background, dedup, min_side, max_pixels, _ = settings
    done = read_manifest(out)
    if done is not None:
        if done.get("key") == key:
            if encoded != "none":
                ensure_encoded(out, encoded, jpeg_quality, workers, progress, _lock_held=True)
            return read_manifest(out)
        if not overwrite:
            if "holdout" not in done:
                raise UserError(f"{out} was prepared before held-out splits existed; pass --overwrite to prepare "
                                "it again with one")
            raise UserError(f"{out} already holds a prepared data set of another source or other settings; "
                            "pass --overwrite to replace it")
    partial = out / ".partial"
    plan = partial / "plan.json"
    if partial.exists():
        try:
            old = json.loads(plan.read_text()).get("key")
        except (OSError, ValueError):
            old = None
        if old is not None and old != decode_key and not overwrite:
            raise UserError(f"{out} holds an interrupted preparation of another source or other settings; "
                            "pass --overwrite to start over")
        if old != decode_key:
            shutil.rmtree(partial)
    elif any(p.name != ".lock" for p in out.iterdir()) and done is None and not overwrite:
        raise UserError(f"{out} exists and is not a prepared data set; choose an empty or new folder "
                        "(or --overwrite)")
    if overwrite and done is not None:
        (out / "manifest.json").unlink()  # from here on the folder is not a data set until the end
    partial.mkdir(parents=True, exist_ok=True)
    if not plan.exists():
        atomic_write_bytes(plan, lambda f: f.write(json.dumps({"key": decode_key, "source": str(src)}).encode()))

    chunks = [entries[i:i + CHUNK] for i in range(0, len(entries), CHUNK)]
    have = [partial / f"chunk-{k:05d}.npz" for k in range(len(chunks))]
    start = sum(1 for p in have if p.exists())
    if start:
        log.info("resuming the preparation of %s: %d of %d chunk(s) already done", src, start, len(chunks))
    threads = workers or min(8, os.cpu_count() or 1)
    bar = tqdm(total=len(entries), initial=sum(len(c) for c, p in zip(chunks, have) if p.exists()), unit="file",
               desc=f"preparing {src.name} @{resolution}", disable=not progress, mininterval=1.0, dynamic_ncols=True)
    with warnings.catch_warnings(), ThreadPoolExecutor(threads) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we enforce max_pixels ourselves
        for chunk, path in zip(chunks, have):
            if path.exists():
                continue
            results = []
            for r in pool.map(lambda e: _process(e, resolution, fit, background, min_side, max_pixels), chunk):
                results.append(r)
                bar.update(1)
            arrays = [a for _, a in results if a is not None]
            stacked = np.stack(arrays) if arrays else np.zeros((0, resolution, resolution, 3), np.uint8)
            records = np.array(json.dumps([r for r, _ in results]))
            atomic_write_bytes(path, lambda f: np.savez(f, images=stacked, records=records))
    bar.close()
    manifest = _assemble(src, kind, out, partial, have, resolution, key, settings, dedup, holdout)
    shutil.rmtree(partial)
    if encoded != "none":
        ensure_encoded(out, encoded, jpeg_quality, workers, progress, _lock_held=True)
        manifest = read_manifest(out)
    return manifest


def _assemble(src, kind, out, partial, chunk_paths, resolution, key, settings, dedup, holdout) -> dict:
    """Concatenate the chunks into images.npy (deduplicated, held-out images last), then write the
    manifest last."""
    images, skipped, first_of = [], [], {}
    for path in chunk_paths:
        with np.load(path) as z:
            records = json.loads(str(z["records"]))
        k = 0
        for r in records:
            if "reason" in r:
                skipped.append(r)
                continue
            if dedup and r["sha256"] in first_of:
                skipped.append({**r, "reason": f"exact duplicate of {first_of[r['sha256']]}"})
            else:
                first_of.setdefault(r["sha256"], r["source"])
                images.append((path, k, r))
            k += 1
    if not images:
        shutil.rmtree(partial, ignore_errors=True)
        reasons = sorted({s["reason"].split(":")[0] for s in skipped})
        raise UserError(f"no images usable in {src} ({len(skipped)} file(s) skipped: {'; '.join(reasons)[:300]})")
    k = holdout_count(holdout, len(images))
    held = holdout_positions([r["source"] for _, _, r in images], k)
    trained = [i for i in range(len(images)) if i not in held]
    row = {i: j for j, i in enumerate(trained + sorted(held))}  # both sides keep the sources' name order

    target = out / "images.npy"
    tmp = out / "images.tmp.npy"
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(images), 3, resolution, resolution))
    loaded: dict = {}
    for i, (path, j, _) in enumerate(images):  # in chunk order (each chunk read once), written to its row
        if path not in loaded:
            loaded.clear()
            with np.load(path) as z:
                loaded[path] = z["images"]
        array[row[i]] = loaded[path][j].transpose(2, 0, 1)
    array.flush()
    del array
    os.replace(tmp, target)
    resolution_, fit, background, dedup_, min_side, max_pixels, version = settings
    manifest = {
        "format": FORMAT, "version": VERSION, "complete": True, "key": key,
        "source": str(src), "source_kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "count": len(images), "resolution": resolution, "layout": "N×3×R×R uint8 RGB (images.npy)",
        "fit": fit, "background": list(background), "min_side": min_side, "max_pixels": max_pixels,
        "dedup": dedup, "resize": "Pillow Lanczos (a=3, antialiased), reducing_gap=3; JPEG draft ≥ 2R",
        "holdout": k, "holdout_requested": holdout, "holdout_rule": HOLDOUT_RULE,
        "images": sorted(({"index": row[i], **r} for i, (_, _, r) in enumerate(images)), key=lambda r: r["index"]),
        "skipped": skipped, "encoded": None,
    }
    _write_manifest(out, manifest)
    log.info("prepared %d image(s) from %s into %s (%d skipped, %d held out for scoring)", len(images), src, out,
             len(skipped), k)
    return manifest


def ensure_encoded(out: Path, encoded: str = "png", jpeg_quality: int = 95, workers: int | None = None,
                   progress: bool = True, _lock_held: bool = False) -> list[Path]:
    """The prepared set's images as encoded files (for DALI), written now if missing, then recorded
    in the manifest (files written first into a temporary folder, renamed, the manifest last)."""
    if not _lock_held:
        with _lock(Path(out)):
            return ensure_encoded(out, encoded, jpeg_quality, workers, progress, _lock_held=True)
    manifest = read_manifest(out)
    if manifest is None:
        raise UserError(f"{out} is not a complete prepared data set")
    suffix = {"png": ".png", "jpeg": ".jpg"}[encoded]
    names = [f"{i:06d}{suffix}" for i in range(manifest["count"])]
    info = manifest.get("encoded")
    if info and info.get("format") == encoded and (encoded == "png" or info.get("quality") == jpeg_quality):
        return [out / "files" / n for n in names]
    if info:  # other files are about to be replaced: the manifest stops naming them first
        manifest["encoded"] = None
        _write_manifest(out, manifest)
    array = np.load(out / "images.npy", mmap_mode="r")
    tmp = out / "files.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    def write(i):
        im = Image.fromarray(np.ascontiguousarray(array[i].transpose(1, 2, 0)))
        if encoded == "png":
            im.save(tmp / names[i], compress_level=1)
        else:
            im.save(tmp / names[i], quality=jpeg_quality, subsampling=0)

    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        list(tqdm(pool.map(write, range(len(names))), total=len(names), unit="img", disable=not progress,
                  desc=f"encoding {encoded}", mininterval=1.0, leave=False))
    shutil.rmtree(out / "files", ignore_errors=True)
    os.replace(tmp, out / "files")
    manifest["encoded"] = {"format": encoded, "folder": "files", "quality": jpeg_quality if encoded == "jpeg" else None}
    _write_manifest(out, manifest)
    return [out / "files" / n for n in names]
