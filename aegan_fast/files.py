"""Writing and hashing files: the two helpers every module that writes a run's, a data set's or an
export's files shares (a leaf module: it imports nothing from the package)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(file) on a temp file beside path, fsync it, rename it over path, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # never hide the error that got us here
            Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself is only durable once the folder's entry is


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # Windows cannot open a folder as a file; NTFS journals the rename
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # filesystems without folder fsync
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes (what ``sha256sum`` prints), read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
