"""The engine directory's manifest.json: what the engine is, and the sha256 of every file it holds.

An engine from elsewhere is checked before anything in it is used (ARCHITECTURE.md, "Safety"): the format
version must be one this library reads, the build must have finished (a build writes `complete: false`
until its parity gate has passed), and everything the runtime reads must be covered by a hash: the files
in the directory are exactly the listed ones, each with its recorded sha256, and every path the manifest
names (graph files, the host side's assets) is one of them, relative and inside the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from .. import atomic
from ..errors import EngineError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")
GRAPHS = ("vision", "decoder")  # what every engine holds (export.py)
# cosine against eager fp32 that each precision must reach on the parity inputs
PARITY_THRESHOLDS = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def engine_files(engine_dir: str | os.PathLike) -> list[str]:
    """Every file under the engine directory but the manifest, as sorted '/'-separated relative paths.

    EngineError on a symbolic link or anything else that is not a plain file or directory: a link could
    make the runtime read what no hash covers (a directory link is not even listed by a glob).
    """
    root = Path(engine_dir)
    names = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        for entry in (*dirs, *files):
            path = Path(folder, entry)
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                raise EngineError(
                    f"{os.fspath(path)!r}: an engine directory holds only plain files and folders "
                    "(links and special files are refused)"
                )
        names += [Path(folder, f).relative_to(root).as_posix() for f in files]
    return sorted(name for name in names if name != MANIFEST)


def write_manifest(engine_dir: str | os.PathLike, fields: dict[str, Any], *, complete: bool) -> dict:
    """Write manifest.json with `fields`, the format version and the hash of every file now in the directory."""
    engine_dir = Path(engine_dir)
    manifest = {"format_version": FORMAT_VERSION, "complete": complete, **fields}
    manifest["files"] = {name: sha256_file(engine_dir / name) for name in engine_files(engine_dir)}
    atomic.write_json(engine_dir / MANIFEST, manifest)
    return manifest


def read_manifest(engine_dir: str | os.PathLike, *, allow_incomplete: bool = False) -> dict:
    """Parse and check manifest.json (format version, completeness); EngineError naming what is wrong."""
    engine_dir = Path(engine_dir)
    where = os.fspath(engine_dir)
    if not engine_dir.is_dir():
        raise EngineError(f"engine directory {where!r} does not exist")
    path = engine_dir / MANIFEST
    if not path.is_file():
        raise EngineError(
            f"{where!r} is not an engine directory: no {MANIFEST} (build one with `vlm2vec-rt build`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise EngineError(f"{path}: expected a JSON object")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise EngineError(f"{path}: no integer format_version")
    if version > FORMAT_VERSION:
        raise EngineError(
            f"{path}: engine format version {version} is newer than this vlm2vec-rt reads "
            f"(up to {FORMAT_VERSION}); upgrade vlm2vec-rt or rebuild the engine"
        )
    if version < 1:
        raise EngineError(f"{path}: invalid format_version {version}")
    if not manifest.get("complete") and not allow_incomplete:
        raise EngineError(f"{path}: the build of this engine did not finish; rebuild it")
    for key in ("backbone", "precision", "backend", "graphs", "files", "dim"):
        if key not in manifest:
            raise EngineError(f"{path}: missing field {key!r}")
    if manifest["precision"] not in PRECISIONS:
        raise EngineError(f"{path}: unknown precision {manifest['precision']!r}")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(d, str) and len(d) == 64 for d in files.values()):
        raise EngineError(f"{path}: field 'files' must map file names to sha256 hashes")
    for name in files:
        _check_relative(path, "file entry", name)
    graphs = manifest["graphs"]
    if not isinstance(graphs, dict) or set(graphs) != set(GRAPHS):
        raise EngineError(f"{path}: field 'graphs' must describe exactly the graphs {', '.join(GRAPHS)}")
    for name, graph in graphs.items():
        if not isinstance(graph, dict) or not isinstance(graph.get("file"), str):
            raise EngineError(f"{path}: graph {name!r} must be an object with a string 'file'")
        _check_relative(path, f"graph {name!r} file", graph["file"])
    return manifest


def _check_relative(manifest_path: Path, what: str, name: Any) -> None:
    """`name` is a canonical relative path inside the engine directory ('a/b.onnx'; no '..', '/x', './a')."""
    pure = PurePosixPath(name) if isinstance(name, str) else None
    if (
        pure is None
        or not name
        or pure.is_absolute()
        or pure.as_posix() != name
        or any(part in (".", "..") for part in pure.parts)
        or "\\" in name
        or name == MANIFEST
    ):
        raise EngineError(
            f"{manifest_path}: {what} {name!r} points outside the engine directory "
            "(entries are relative paths inside it)"
        )


def verify_files(
    engine_dir: str | os.PathLike,
    manifest: dict,
    *,
    required: Sequence[str] = (),
    hashes: bool = True,
) -> None:
    """Tie everything the runtime loads to the manifest's hashes; EngineError naming the first problem.

    The files in the directory are exactly those the manifest lists (none missing, none extra, no links),
    every graph file and every name in `required` (the host side's assets) is among them, and, unless
    hashes=False (a trusted engine), each file has its recorded sha256. The manifest must have been
    through `read_manifest` (entries are checked relative paths).
    """
    engine_dir = Path(engine_dir)
    where = engine_dir / MANIFEST
    listed = manifest["files"]
    needed = [graph["file"] for graph in manifest["graphs"].values()] + list(required)
    for name in needed:
        if name not in listed:
            raise EngineError(f"{where}: {name!r} is loaded by the engine but has no sha256 in 'files'")
    present = engine_files(engine_dir)
    missing = sorted(set(listed) - set(present))
    if missing:
        raise EngineError(
            f"engine file {os.fspath(engine_dir / missing[0])!r} is missing (the engine is incomplete; "
            "rebuild it)"
        )
    unlisted = sorted(set(present) - set(listed))
    if unlisted:
        raise EngineError(
            f"engine file {os.fspath(engine_dir / unlisted[0])!r} is not listed in {MANIFEST} "
            "(added after the build, or the manifest was edited; rebuild the engine)"
        )
    if not hashes:
        return
    stamps = _VerifiedStamps(engine_dir)
    for name, digest in listed.items():
        path = engine_dir / name
        if stamps.unchanged(name, digest):
            continue
        if sha256_file(path) != digest:
            raise EngineError(
                f"engine file {os.fspath(path)!r} does not match its sha256 in {MANIFEST} "
                "(modified or corrupted; rebuild the engine)"
            )
        stamps.verified(name, digest)
    stamps.save()


def verified_cache_dir() -> Path:
    """Where the stamps of verified engine files are kept: $VLM2VEC_RT_CACHE_DIR/verified, else
    ~/.cache/vlm2vec_rt/verified."""
    root = os.environ.get("VLM2VEC_RT_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "vlm2vec_rt"
    )
    return Path(root) / "verified"


class _VerifiedStamps:
    """Files of one engine directory whose sha256 was checked, with the stat they had then.

    A file whose size, mtime, ctime, inode and device are unchanged since its sha256 matched is not read
    again (a 7B engine is tens of GB to hash). Any write to a file changes its ctime, which no user can set
    back (setting mtime sets ctime to now), so a changed byte is still refused. The stamps live outside the
    engine directory (which holds only its listed files), keyed by its real path; a cache that cannot be
    read or written only costs the hashing.
    """

    def __init__(self, engine_dir: Path):
        self.dir = engine_dir
        real = os.path.realpath(engine_dir)
        self.path = verified_cache_dir() / f"{hashlib.sha256(real.encode()).hexdigest()[:32]}.json"
        try:
            self.old = json.loads(self.path.read_text(encoding="utf-8")).get("files", {})
        except (OSError, ValueError, AttributeError):
            self.old = {}
        self.new: dict[str, list] = {}

    def _stat(self, name: str) -> list[int]:
        st = os.stat(self.dir / name)
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]

    def unchanged(self, name: str, digest: str) -> bool:
        stamp = self.old.get(name)
        if stamp != [digest, *self._stat(name)]:
            return False
        self.new[name] = stamp
        return True

    def verified(self, name: str, digest: str) -> None:
        self.new[name] = [digest, *self._stat(name)]

    def save(self) -> None:
        if self.new == self.old:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_json(self.path, {"engine": os.path.realpath(self.dir), "files": self.new})
        except OSError:
            pass  # no cache: the next load hashes again
