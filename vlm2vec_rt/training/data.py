"""MMEB-train reader and the batch sampler.

    data_dir/<Dataset>/<split>-*.parquet   columns qry, qry_image_path, pos_text, pos_image_path,
                                           and optionally neg_text, neg_image_path (hard negatives)
    image_root/<path in the file>          (default data_dir/train_images when it exists, else data_dir)

Texts are taken as MMEB writes them (instruction and `<|image_1|>` placeholder already in place). Every row
is checked when the data is read, before any training step: an unreadable or empty file, missing columns, a
side with neither text nor image, a placeholder without an image or a missing image file raises InputError
naming the file and row. Several datasets are pooled and shuffled together (mixed in proportion to size).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..eval.reader import string_cell
from ..preprocess.items import MMEB_IMAGE_PLACEHOLDER, Item

QUERY_COLUMNS = ("qry", "qry_image_path")
POSITIVE_COLUMNS = ("pos_text", "pos_image_path")
NEGATIVE_COLUMNS = ("neg_text", "neg_image_path")
REQUIRED_COLUMNS = QUERY_COLUMNS + POSITIVE_COLUMNS

Key = tuple[str, str]  # (text, image path as written in the file); identifies a target


@dataclass(frozen=True)
class Example:
    """One training row: a query, its positive, optionally a hard negative; `source` names file and row."""

    query: Item
    positive: Item
    negative: Item | None
    source: str
    target: Key  # the positive's identity: the sampler keeps equal targets out of one batch


@dataclass
class TrainData:
    """Every example of the datasets read, in file order, and how many came from each dataset."""

    examples: list[Example]
    datasets: dict[str, int]
    image_root: Path

    def __len__(self) -> int:
        return len(self.examples)


def list_train_datasets(data_dir: str | os.PathLike, split: str = "original") -> list[str]:
    """Dataset folders under data_dir holding a `<split>-*.parquet` file, by name."""
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(f"training data directory {os.fspath(root)!r} does not exist")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob(f"{split}-*.parquet")))


def read_train_data(
    data_dir: str | os.PathLike,
    *,
    datasets: Sequence[str] | None = None,
    split: str = "original",
    image_root: str | os.PathLike | None = None,
) -> TrainData:
    """Read and check MMEB-train datasets (all folders with `<split>-*.parquet` files when datasets is None)."""
    root = Path(data_dir)
    names = list(datasets) if datasets is not None else list_train_datasets(root, split)
    if not names:
        raise InputError(
            f"no training data in {os.fspath(root)!r}: expected DATA/<Dataset>/{split}-*.parquet (MMEB-train layout)"
        )
    if image_root is None:
        image_root = root / "train_images" if (root / "train_images").is_dir() else root
    reader = _RowReader(Path(image_root))
    counts: dict[str, int] = {}
    for name in names:
        folder = root / name
        files = sorted(folder.glob(f"{split}-*.parquet"))
        if not files:
            raise InputError(f"dataset {name!r}: no {split}-*.parquet file in {os.fspath(folder)!r}")
        before = len(reader.examples)
        for f in files:
            reader.read_file(f)
        counts[name] = len(reader.examples) - before
    return TrainData(reader.examples, counts, Path(image_root))


class _RowReader:
    def __init__(self, image_root: Path):
        self.image_root = image_root
        self.examples: list[Example] = []
        self._exists: dict[str, bool] = {}

    def read_file(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        where_file = os.fspath(path)
        try:
            names = pq.read_schema(path).names
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{where_file}: cannot read as parquet: {e}") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise InputError(
                f"{where_file}: lacks column(s) {missing} (has {names}; MMEB-train needs "
                f"{list(REQUIRED_COLUMNS)}, optionally {list(NEGATIVE_COLUMNS)})"
            )
        has_neg = [c in names for c in NEGATIVE_COLUMNS]
        if any(has_neg) and not all(has_neg):
            raise InputError(
                f"{where_file}: has only one of the hard-negative columns {list(NEGATIVE_COLUMNS)}"
            )
        columns = list(REQUIRED_COLUMNS) + (list(NEGATIVE_COLUMNS) if all(has_neg) else [])
        try:
            table = pq.read_table(path, columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{where_file}: cannot read as parquet: {e}") from None
        if table.num_rows == 0:
            raise InputError(f"{where_file}: has no rows")
        data = {c: table.column(c).to_pylist() for c in columns}
        for r in range(table.num_rows):
            where = f"{where_file}, row {r}"
            query = self._item(data, r, "qry", "qry_image_path", where, "query")
            positive = self._item(data, r, "pos_text", "pos_image_path", where, "positive")
            negative = None
            if all(has_neg):
                negative = self._item(data, r, "neg_text", "neg_image_path", where, "negative")
            for side, item in (("query", query), ("positive", positive)):
                if item is None:
                    raise InputError(f"{where}: the {side} has neither text nor image")
            target = (data["pos_text"][r] or "", data["pos_image_path"][r] or "")
            self.examples.append(Example(query, positive, negative, where, target))

    def _item(self, data: dict, r: int, text_col: str, image_col: str, where: str, side: str) -> Item | None:
        """The side's Item, or None when it has neither text nor image."""
        text = string_cell(data[text_col][r], where, text_col)
        image_path = string_cell(data[image_col][r], where, image_col)
        if not text.strip() and not image_path:
            return None
        if text.count(MMEB_IMAGE_PLACEHOLDER) > 1:
            raise InputError(f"{where}: the {side} text holds {MMEB_IMAGE_PLACEHOLDER} more than once")
        if not image_path and MMEB_IMAGE_PLACEHOLDER in text:
            raise InputError(
                f"{where}: the {side} text holds {MMEB_IMAGE_PLACEHOLDER} but {image_col!r} is empty"
            )
        image = None
        if image_path:
            image = os.path.join(self.image_root, image_path)
            if image_path not in self._exists:
                self._exists[image_path] = os.path.isfile(image)
            if not self._exists[image_path]:
                raise InputError(f"{where}: the {side} image file {image!r} does not exist")
        try:
            return Item(text=text or None, image=image)
        except InputError as e:
            raise InputError(f"{where}: the {side}: {e}") from None


class DistinctTargetSampler:
    """Shuffled batches of example indices in which no target occurs twice.

    A repeated target in one batch would be scored as its own negative (a false negative); classification
    sets with few labels make that common. Each epoch is a fixed function of (seed, epoch), so a position
    (epoch, batch index) is all a checkpoint needs. Examples that do not fit an epoch's batches (a repeated
    target near the end) wait for the next epoch's shuffle.
    """

    def __init__(self, targets: Sequence[Key], batch_size: int, *, seed: int = 0):
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        codes: dict[Key, int] = {}
        self.codes = np.array([codes.setdefault(t, len(codes)) for t in targets], dtype=np.int64)
        if len(codes) < batch_size:
            raise InputError(
                f"batch size {batch_size} is larger than the number of distinct targets in the data "
                f"({len(codes)}): every batch would hold a false negative; lower the batch size or add datasets"
            )
        self.batch_size = batch_size
        self.seed = seed
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """The batches of one epoch: arrays of batch_size example indices, targets distinct within each."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.codes))
        batches: list[np.ndarray] = []
        deferred: list[int] = []
        stream = iter(order.tolist())
        while True:
            batch: list[int] = []
            seen: set[int] = set()
            skipped: list[int] = []
            for i in deferred:  # what waited from earlier batches goes first
                if len(batch) < self.batch_size and self.codes[i] not in seen:
                    batch.append(i)
                    seen.add(self.codes[i])
                else:
                    skipped.append(i)
            while len(batch) < self.batch_size:
                i = next(stream, None)
                if i is None:
                    break
                if self.codes[i] in seen:
                    skipped.append(i)
                else:
                    batch.append(i)
                    seen.add(self.codes[i])
            deferred = skipped
            if len(batch) < self.batch_size:
                break
            batches.append(np.array(batch, dtype=np.int64))
        if not batches:
            raise InputError("the data does not fill one batch of distinct targets")
        self._cache = (epoch, batches)
        return batches

    def batch_at(self, epoch: int, index: int) -> tuple[np.ndarray, int, int]:
        """The batch at (epoch, index), and the position after it."""
        batches = self.epoch(epoch)
        if index >= len(batches):
            epoch, index = epoch + 1, 0
            batches = self.epoch(epoch)
        return batches[index], epoch, index + 1
