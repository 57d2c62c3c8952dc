"""Atomic writes: a file or directory appears complete or not at all (kills, errors, Ctrl-C included)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create 0600/0700; what we publish gets the permissions a plain open/mkdir would give.
_UMASK = _umask()
_FILE_MODE = 0o666 & ~_UMASK
_DIR_MODE = 0o777 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success it is renamed onto `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, _FILE_MODE)
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array), allow_pickle=False)


def publish_modes(root: str | os.PathLike) -> None:
    """Give every file and folder under `root` the permissions a plain open/mkdir gives under this umask.

    Writers inside an atomic directory (safetensors through transformers' save_pretrained among them) may
    go through private temporary files (0600): what is published should read like the rest of the folder.
    Execute bits a file has are kept (as far as the umask allows); symbolic links are left alone.
    """
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            target = os.path.join(folder, name)
            if not os.path.islink(target):
                os.chmod(target, _DIR_MODE)
        for name in files:
            target = os.path.join(folder, name)
            st = os.lstat(target)
            if stat.S_ISREG(st.st_mode):
                os.chmod(target, _FILE_MODE | (st.st_mode & 0o111 & _DIR_MODE))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`, renamed onto `path` when the block succeeds.

    With overwrite=True an existing `path` is replaced only after the new one is complete, so what was
    saved before is never lost to a failed write.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{os.fspath(path)!r} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, _DIR_MODE)
        yield tmp
        publish_modes(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / "x", path)  # put back what was saved; if even that fails, it stays in old/x
                os.rmdir(old)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
