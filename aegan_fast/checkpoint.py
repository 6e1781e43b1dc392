"""Run directories and checkpoints.

A checkpoint is written to a temporary file in the same folder, fsync'ed, renamed over its final
name and the folder fsync'ed; only then is ``checkpoints/latest`` replaced the same way. ``latest``
is the commit marker: a file counts as a checkpoint only once ``latest`` lists it, so a kill at any
moment leaves the previous checkpoint loadable, and a file renamed in but never committed is not used.

``latest`` lists every kept checkpoint, the current one first, in ``sha256sum`` format
(``<sha256>  <name>``; ``cd checkpoints && sha256sum -c latest`` checks them by hand). The digest is
what catches a flipped byte inside a tensor: torch.load does not, it would load wrong weights.
A resume falls back along that list, newest first, when a file is truncated or corrupt.

``checkpoints/sampling`` (one file name; the trainer writes it at each chain stage's end after the
first) names the stage-end checkpoint whose sampling chain scored the best SWD: a stage that made
the samples worse is trained but not sampled from. Sampling, eval and export of a run directory
follow it; resuming always follows ``latest``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .files import atomic_write_bytes, sha256_file

LATEST = "latest"
SAMPLING = "sampling"
PERIODIC = "ckpt-"  # periodic checkpoints, pruned to the newest few; stage-end ones are kept
log = logging.getLogger("aegan_fast.checkpoint")


class NonFiniteCheckpoint(UserError):
    """A state holding a NaN or Inf: refused before anything is written (``.key`` names where)."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


class CheckpointWriteError(UserError):
    """The disk refused a checkpoint (full, read-only, no permission, I/O error); the previous one is intact."""


def _leaves(obj, key: str = ""):
    """(key path, value) of every leaf in nested dicts, lists and tuples: "opts/D_R/state/3/exp_avg"."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        yield key, obj
        return
    for k, v in items:
        yield from _leaves(v, f"{key}/{k}" if key else str(k))


def first_nonfinite(state) -> str | None:
    """Key path of the first floating tensor in state holding a NaN or Inf, or None."""
    for key, v in _leaves(state):
        if (isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())
                and not bool(torch.isfinite(v).all())):
            return key
    return None


def _state_mb(state) -> float:
    return sum(v.numel() * v.element_size() for _, v in _leaves(state) if isinstance(v, torch.Tensor)) / 2**20


_LINE = re.compile(r"([0-9a-f]{64})  (.+)")


def _read_manifest(folder: Path) -> list[tuple[str, str | None]]:
    """(name, sha256) of the committed checkpoints, current first. A pointer from before the digests
    holds one bare name: (name, None)."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return []
    entries = []
    for line in pointer.read_text(errors="replace").splitlines():
        m = _LINE.fullmatch(line)
        if m:
            entries.append((m[2], m[1]))
        elif line.strip():
            entries.append((line.strip(), None))
    return entries


def _manifest_text(entries) -> str:
    # an entry from an old bare-name pointer stays bare: hashing it now would vouch for a file never checked
    return "".join(f"{d}  {n}\n" if d else f"{n}\n" for n, d in entries)


def save_checkpoint(run_dir: Path, name: str, state: dict, keep: int = 3) -> Path:
    """Write a checkpoint and commit it in ``latest``, then drop all but the ``keep`` newest periodic
    (``ckpt-*``) checkpoints: a long run at R=512 would otherwise fill the disk. Stage-end ones and
    the current one are always kept. Raises NonFiniteCheckpoint (nothing written) or CheckpointWriteError."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (the checkpoint being written), got {keep}")
    key = first_nonfinite(state)
    if key is not None:
        raise NonFiniteCheckpoint(f"refusing to write checkpoint {name}: {key} holds a NaN or Inf "
                                  f"(the run diverged; the previous checkpoint is kept)", key)
    folder = Path(run_dir) / "checkpoints"
    path = folder / name
    for stale in folder.glob(".*.tmp"):  # a writer killed mid-file left it (one writer per run)
        with contextlib.suppress(OSError):
            stale.unlink()
    old = _read_manifest(folder)
    renamed = False
    try:
        atomic_write_bytes(path, lambda f: torch.save(state, f))
        renamed = True
        entries = [(name, sha256_file(path))] + [e for e in old if e[0] != name and (folder / e[0]).exists()]
        # newest first as committed, not by name: after going back to an older checkpoint the
        # current one has the smallest count, and must stay
        dropped = set([n for n, _ in entries if n.startswith(PERIODIC)][keep:])
        entries = [e for e in entries if e[0] not in dropped]
        atomic_write_bytes(folder / LATEST, lambda f: f.write(_manifest_text(entries).encode()))
    except OSError as e:
        if renamed and name not in {n for n, _ in old}:
            with contextlib.suppress(OSError):
                path.unlink()  # renamed in but never committed: nothing may load it
        # a file of the same name was replaced by the rename: the previous checkpoint is the next one
        intact = [n for n, _ in old if not (renamed and n == name)]
        before = f"the previous checkpoint {folder / intact[0]} is intact" if intact else "no earlier checkpoint exists"
        target = path if not renamed else folder / LATEST
        raise CheckpointWriteError(
            f"could not write {target}: {os.strerror(e.errno) if e.errno else e} (checkpoint of about "
            f"{_state_mb(state):.1f} MB); {before}") from e
    for n in dropped:  # only once the new list is committed: until then they are fallbacks
        try:
            (folder / n).unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not delete old checkpoint %s: %s", folder / n, e)
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    entries = _read_manifest(Path(run_dir) / "checkpoints")
    if not entries:
        return None
    path = Path(run_dir) / "checkpoints" / entries[0][0]
    return path if path.exists() else None


def write_sampling_pointer(run_dir: Path, name: str) -> None:
    """Make the committed checkpoint ``name`` the run's sampling default (atomically)."""
    atomic_write_bytes(Path(run_dir) / "checkpoints" / SAMPLING, lambda f: f.write(f"{name}\n".encode()))


def _sampling_entry(folder: Path) -> tuple[str, str | None] | None:
    """(name, sha256) of the checkpoint ``sampling`` names, None without a pointer; a UserError saying
    what is wrong with a pointer that cannot be followed."""
    pointer = folder / SAMPLING
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    committed = dict(_read_manifest(folder))
    if not name or Path(name).name != name:  # a path elsewhere would be sampled unverified
        raise UserError(f"{pointer} does not name a checkpoint file ({name[:80]!r})")
    if name not in committed or not (folder / name).is_file():
        raise UserError(f"{pointer} names {name}, which is not a committed checkpoint of this run")
    return name, committed[name]


def _warn_sampling_fallback(folder: Path, e: UserError) -> None:
    log.warning("%s; sampling from the latest checkpoint %s instead", e, latest_checkpoint(folder.parent) or "(none)")


def _latest_of(run_dir: Path) -> Path:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"{run_dir} holds no checkpoint (no checkpoints/{LATEST} pointer)")
    return ckpt


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file to sample from: a checkpoint file as given; for a run directory the one its
    ``sampling`` pointer names when that file is intact (its sha256 as committed), else its latest
    (with a warning when a pointer exists but cannot be followed)."""
    p = Path(path).expanduser()
    if p.is_dir():
        folder = p / "checkpoints"
        try:
            entry = _sampling_entry(folder)
            if entry is not None:
                name, digest = entry
                if digest is not None and sha256_file(folder / name) != digest:
                    raise UserError(f"checkpoint {folder / name}, which {SAMPLING} names, is truncated or corrupt "
                                    f"(its sha256 differs from the one recorded in {LATEST})")
                return folder / name
        except UserError as e:
            _warn_sampling_fallback(folder, e)
        return _latest_of(p)
    if p.is_file():
        return p
    raise UserError(f"no run directory or checkpoint at {p}")


def _load(path: Path, digest: str | None, map_location) -> dict:
    """One checkpoint file, checked against its committed digest when it has one."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} is missing")
    try:
        if digest is not None and sha256_file(path) != digest:
            raise UserError(f"checkpoint {path} is truncated or corrupt: its sha256 differs from the one "
                            f"recorded in {LATEST} when it was written")
        # weights_only: a checkpoint is plain tensors, numbers and strings; never unpickle code.
        return torch.load(path, map_location=map_location, weights_only=True)
    except UserError:
        raise
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {reason})") from None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The state in a checkpoint file, or in a run directory's latest checkpoint (no fallback: see
    load_for_resume). A truncated or corrupt file is a UserError naming it."""
    p = Path(path).expanduser()
    ckpt = _latest_of(p) if p.is_dir() else resolve_checkpoint(p)
    digest = dict(_read_manifest(ckpt.parent)).get(ckpt.name)  # a file copied out alone has none
    return _load(ckpt, digest, map_location)


def load_for_resume(run_dir: str | Path, map_location="cpu") -> tuple[dict, Path]:
    """(state, path) of the newest committed checkpoint of a run that loads, falling back along
    ``latest``'s list (newest first) past missing, truncated or corrupt files with a warning each."""
    folder = Path(run_dir) / "checkpoints"
    entries = _read_manifest(folder)
    if not entries:
        raise UserError(f"{run_dir} holds no checkpoint (no checkpoints/{LATEST} pointer)")
    tried = []
    for i, (name, digest) in enumerate(entries):
        try:
            return _load(folder / name, digest, map_location), folder / name
        except UserError as e:
            tried.append(str(e))
            if i + 1 < len(entries):
                log.warning("%s; falling back to %s", e, folder / entries[i + 1][0])
    raise UserError(f"no checkpoint of {run_dir} can be loaded; tried:\n  " + "\n  ".join(tried))


def load_state_strict(module: nn.Module, state_dict: dict, what: str) -> None:
    """module.load_state_dict(strict=True), with a clear error naming the first missing or unexpected
    key or shape mismatch instead of torch's wall of every key."""
    own = module.state_dict()
    # shapes first: they tell a width or resolution apart, where a missing key only says "different"
    problems = [f"the checkpoint's {k} is {list(state_dict[k].shape)}, this model's {list(v.shape)}"
                for k, v in own.items() if k in state_dict and hasattr(state_dict[k], "shape")
                and tuple(state_dict[k].shape) != tuple(v.shape)]
    problems += [f"this model has {k} but the checkpoint does not" for k in own if k not in state_dict]
    problems += [f"the checkpoint has {k}, which this model does not" for k in state_dict if k not in own]
    if problems:
        more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
        raise UserError(f"{what}: {problems[0]}{more}: the checkpoint is from another configuration or resolution")
    module.load_state_dict(state_dict, strict=True)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v  # a tuple and its list are the same setting
    return out


def config_mismatch(saved: dict, now: dict, ignore: tuple = ()) -> list[str]:
    """"model.resolution: checkpoint 64, now 128" for each setting (nested ones by dotted name) that
    differs, leaving out the names in ignore and everything under them."""
    a, b = _flat(saved), _flat(now)
    lines = []
    for k in sorted(a.keys() | b.keys()):
        if any(k == i or k.startswith(f"{i}.") for i in ignore) or a.get(k, ...) == b.get(k, ...):
            continue
        lines.append(f"{k}: checkpoint {repr(a[k]) if k in a else '(not set)'}, "
                     f"now {repr(b[k]) if k in b else '(not set)'}")
    return lines


def load_for_sampling(path: str | Path, map_location="cpu") -> tuple[dict, Path]:
    """(state, file) of a checkpoint file, or of a run directory's sampling default (see
    resolve_checkpoint; a pointed-to file that fails to load falls back to the latest with a
    warning). Logs the file used."""
    p = Path(path).expanduser()
    state = None
    if p.is_dir():
        folder = p / "checkpoints"
        try:
            entry = _sampling_entry(folder)
            if entry is not None:
                ckpt = folder / entry[0]
                state = _load(ckpt, entry[1], map_location=map_location)
        except UserError as e:
            _warn_sampling_fallback(folder, e)
    if state is None:
        ckpt = _latest_of(p) if p.is_dir() else resolve_checkpoint(p)
        state = load_checkpoint(ckpt, map_location=map_location)
    log.info("sampling nets from %s", ckpt)
    return state, ckpt
