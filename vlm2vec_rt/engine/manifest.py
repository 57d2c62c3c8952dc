"""The engine directory's manifest.json: what the engine is, and the sha256 of every file it holds.

An engine from elsewhere is checked before anything in it is used (ARCHITECTURE.md, "Safety"): the format
version must be one this library reads, every listed file must be present with its recorded hash, and the
build must have finished (a build writes `complete: false` until its parity gate has passed).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .. import atomic
from ..errors import EngineError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")
# cosine against eager fp32 that each precision must reach on the parity inputs
PARITY_THRESHOLDS = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def engine_files(engine_dir: str | os.PathLike) -> list[str]:
    """Every file under the engine directory but the manifest, as sorted '/'-separated relative paths."""
    root = Path(engine_dir)
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST
    )


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
    if not isinstance(manifest["files"], dict):
        raise EngineError(f"{path}: field 'files' must map file names to sha256 hashes")
    return manifest


def verify_files(engine_dir: str | os.PathLike, manifest: dict) -> None:
    """Every file the manifest lists exists with its recorded sha256; EngineError naming the first that does not."""
    root = Path(engine_dir).resolve()
    for name, digest in manifest["files"].items():
        path = (root / name).resolve()
        if root not in path.parents:  # a manifest must not point outside its directory
            raise EngineError(f"{root / MANIFEST}: file entry {name!r} points outside the engine directory")
        if not path.is_file():
            raise EngineError(
                f"engine file {os.fspath(path)!r} is missing (the engine is incomplete; rebuild it)"
            )
        if sha256_file(path) != digest:
            raise EngineError(
                f"engine file {os.fspath(path)!r} does not match its sha256 in {MANIFEST} "
                "(modified or corrupted; rebuild the engine)"
            )
