"""Reader for the official MMEB-eval layout: queries, their candidate lists (positive first), images checked.

    data_dir/<Dataset>/test-00000-of-00001.parquet   columns qry_text, qry_img_path, tgt_text, tgt_img_path
    image_root/<path in the file>                    (default data_dir/eval_images)

Images are read as the official VLM2Vec code reads them, a plain `Image.open`: as stored, with no EXIF
orientation applied (`StoredImage`), where an image given to `encode` by path is turned upright.

Each side is deduplicated: every distinct (text, image path) pair gets one index, so it is embedded once.
Every problem raises InputError naming the dataset, the file, the row and the path; with skip_missing=True
missing images, empty candidate lists, a missing parquet file and missing columns become reported skips.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..preprocess.images import StoredImage
from ..preprocess.items import MMEB_IMAGE_PLACEHOLDER, Item, string_cell
from .registry import known_datasets

EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
EVAL_FILE_PATTERN = "test-*.parquet"

Key = tuple[str, str]  # (text, image path relative to the image root, "" for no image)


@dataclass(frozen=True)
class Skip:
    """A row (or, with row None, a whole dataset) left out under skip_missing, and why."""

    dataset: str
    row: int | None
    reason: str
    paths: tuple[str, ...] = ()
    file: str | None = None

    def as_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "file": self.file,
            "row": self.row,
            "reason": self.reason,
            "paths": list(self.paths),
        }


@dataclass
class EvalData:
    """One dataset, deduplicated. query_index [Q] and candidate_index [Q, K] index into the unique keys;
    candidate_index is -1 past the end of a shorter candidate list; column 0 is the positive."""

    name: str
    image_root: Path
    queries: list[Key]
    candidates: list[Key]
    query_index: np.ndarray  # [Q] int64
    candidate_index: np.ndarray  # [Q, K] int64, -1 = padding
    rows: np.ndarray  # [Q] int64: the row each query came from (over all the dataset's files)
    files: list[str]
    skipped: list[Skip] = field(default_factory=list)

    @property
    def num_queries(self) -> int:
        return int(self.query_index.shape[0])

    @property
    def candidates_per_query(self) -> tuple[int, int]:
        """(fewest, most) candidates any query has."""
        counts = (self.candidate_index >= 0).sum(axis=1)
        return int(counts.min()), int(counts.max())

    def items(self, side: str, order: np.ndarray | None = None) -> list[Item]:
        """The side's ("queries" | "candidates") unique keys as Items (images as absolute paths, decoded as
        stored: `StoredImage`, as the official code's plain `Image.open`)."""
        keys = self.queries if side == "queries" else self.candidates
        if order is not None:
            keys = [keys[i] for i in order]
        root = os.fspath(self.image_root)
        return [
            Item(text=t or None, image=StoredImage(os.path.join(root, p)) if p else None) for t, p in keys
        ]


def dataset_files(data_dir: str | os.PathLike, name: str) -> list[Path]:
    """The dataset's parquet files in order; InputError when the folder or the files are missing."""
    folder = Path(data_dir) / name
    if not folder.is_dir():
        raise InputError(
            f"dataset {name!r}: no folder {os.fspath(folder)!r} "
            f"(MMEB-eval layout: DATA/<Dataset>/{EVAL_FILE_PATTERN})"
        )
    files = sorted(folder.glob(EVAL_FILE_PATTERN))
    if not files:
        raise InputError(f"dataset {name!r}: no {EVAL_FILE_PATTERN} file in {os.fspath(folder)!r}")
    return files


def list_datasets(data_dir: str | os.PathLike) -> list[str]:
    """Dataset folders under data_dir that hold a test-*.parquet file: known datasets in registry order,
    then any others by name."""
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(f"data directory {os.fspath(root)!r} does not exist")
    present = {p.name for p in root.iterdir() if p.is_dir() and any(p.glob(EVAL_FILE_PATTERN))}
    order = list(known_datasets())
    return [n for n in order if n in present] + sorted(present - set(order))


def read_dataset(
    data_dir: str | os.PathLike,
    name: str,
    *,
    image_root: str | os.PathLike | None = None,
    skip_missing: bool = False,
) -> EvalData | Skip:
    """Read and check one dataset. Returns a Skip instead of raising for a skippable problem when
    skip_missing is set (a missing file or column: the whole dataset; a missing image or an empty
    candidate list: that row, listed in EvalData.skipped)."""
    image_root = Path(image_root) if image_root is not None else Path(data_dir) / "eval_images"
    try:
        files = dataset_files(data_dir, name)
        tables = [_read_table(f, name) for f in files]
    except InputError as e:
        if skip_missing:
            return Skip(name, None, str(e))
        raise
    builder = _Builder(name, image_root, skip_missing)
    offset = 0
    for f, columns in zip(files, tables):
        for r, row in enumerate(zip(*(columns[c] for c in EVAL_COLUMNS))):
            builder.add(os.fspath(f), offset + r, *row)
        offset += len(columns["qry_text"])
    if not builder.query_index:
        if not offset and not skip_missing:
            raise InputError(f"dataset {name!r}: {os.fspath(files[0])!r} has no rows")
        return Skip(
            name, None, "no rows left to evaluate (all skipped)" if offset else "the dataset has no rows"
        )
    return builder.build([os.fspath(f) for f in files])


def _read_table(path: Path, name: str) -> dict[str, list]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        missing = [c for c in EVAL_COLUMNS if c not in schema.names]
        if missing:
            raise InputError(
                f"dataset {name!r}: {os.fspath(path)!r} lacks column(s) {missing} "
                f"(has {schema.names}; MMEB-eval needs {list(EVAL_COLUMNS)})"
            )
        table = pq.read_table(path, columns=list(EVAL_COLUMNS))
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"dataset {name!r}: cannot read {os.fspath(path)!r} as parquet: {e}") from None
    return {c: table.column(c).to_pylist() for c in EVAL_COLUMNS}


class _Builder:
    """Accumulates rows into deduplicated keys and index arrays, checking each row."""

    def __init__(self, name: str, image_root: Path, skip_missing: bool):
        self.name, self.image_root, self.skip_missing = name, image_root, skip_missing
        self.query_ids: dict[Key, int] = {}
        self.candidate_ids: dict[Key, int] = {}
        self.query_index: list[int] = []
        self.candidate_lists: list[list[int]] = []
        self.rows: list[int] = []
        self.skipped: list[Skip] = []
        self._exists: dict[str, bool] = {}

    def add(self, file: str, row: int, qry_text, qry_img, tgt_text, tgt_img) -> None:
        where = f"dataset {self.name!r}, {file} row {row}"
        query = (string_cell(qry_text, where, "qry_text"), string_cell(qry_img, where, "qry_img_path"))
        candidates = _candidate_list(tgt_text, tgt_img, where)
        _check_key(query, where, "query")
        for k, key in enumerate(candidates):
            if key not in self.candidate_ids:  # each distinct candidate is checked once
                _check_key(key, where, f"candidate {k}")
        if not candidates:
            self._problem(file, row, where, "empty candidate list", ())
            return
        missing = [p for p in (query[1], *(c[1] for c in candidates)) if p and not self._is_file(p)]
        if missing:
            missing = list(dict.fromkeys(missing))
            self._problem(file, row, where, "image file missing", tuple(missing))
            return
        self.query_index.append(self.query_ids.setdefault(query, len(self.query_ids)))
        self.candidate_lists.append(
            [self.candidate_ids.setdefault(c, len(self.candidate_ids)) for c in candidates]
        )
        self.rows.append(row)

    def build(self, files: list[str]) -> EvalData:
        width = max(len(c) for c in self.candidate_lists)
        candidate_index = np.full((len(self.candidate_lists), width), -1, dtype=np.int64)
        for i, c in enumerate(self.candidate_lists):
            candidate_index[i, : len(c)] = c
        return EvalData(
            name=self.name,
            image_root=self.image_root,
            queries=list(self.query_ids),
            candidates=list(self.candidate_ids),
            query_index=np.asarray(self.query_index, dtype=np.int64),
            candidate_index=candidate_index,
            rows=np.asarray(self.rows, dtype=np.int64),
            files=files,
            skipped=self.skipped,
        )

    def _is_file(self, rel: str) -> bool:
        if rel not in self._exists:
            self._exists[rel] = os.path.isfile(os.path.join(self.image_root, rel))
        return self._exists[rel]

    def _problem(self, file: str, row: int, where: str, reason: str, paths: tuple[str, ...]) -> None:
        if not self.skip_missing:
            shown = ", ".join(repr(os.path.join(os.fspath(self.image_root), p)) for p in paths[:3])
            more = f" (and {len(paths) - 3} more)" if len(paths) > 3 else ""
            raise InputError(f"{where}: {reason}" + (f": {shown}{more}" if paths else ""))
        self.skipped.append(Skip(self.name, row, reason, paths, file))


def _candidate_list(texts, paths, where: str) -> list[Key]:
    # The official files hold lists; a scalar (the reference code accepts tgt_text == "") is broadcast.
    if isinstance(texts, list) and isinstance(paths, list):
        if len(texts) != len(paths):
            raise InputError(f"{where}: tgt_text has {len(texts)} entries but tgt_img_path has {len(paths)}")
    elif isinstance(texts, list):
        paths = [string_cell(paths, where, "tgt_img_path")] * len(texts)
    elif isinstance(paths, list):
        texts = [string_cell(texts, where, "tgt_text")] * len(paths)
    else:
        texts, paths = [texts], [paths]
        if not string_cell(texts[0], where, "tgt_text") and not string_cell(paths[0], where, "tgt_img_path"):
            return []
    return [
        (string_cell(t, where, "tgt_text"), string_cell(p, where, "tgt_img_path"))
        for t, p in zip(texts, paths)
    ]


def _check_key(key: Key, where: str, what: str) -> None:
    text, image = key
    if not image and not text.strip():
        raise InputError(f"{where}: {what} has neither text nor image")
    if not image and MMEB_IMAGE_PLACEHOLDER in text:
        raise InputError(f"{where}: {what} text holds {MMEB_IMAGE_PLACEHOLDER} but no image path is given")
