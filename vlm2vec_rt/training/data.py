"""MMEB-train reader and the batch sampler.

    data_dir/<Dataset>/<split>-*.parquet   columns qry, qry_image_path, pos_text, pos_image_path,
                                           and optionally neg_text, neg_image_path (hard negatives)
    image_root/<path in the file>          (default data_dir/train_images when it exists, else data_dir)

Texts are taken as MMEB writes them (instruction and `<|image_1|>` placeholder already in place). Every row
is checked when the data is read, before any training step: an unreadable or empty file, missing columns, a
side with neither text nor image, a placeholder without an image or a missing image file raises InputError
naming the file and row. Several datasets are read together; DistinctTargetSampler makes each batch from
one dataset and uses every row once per epoch, so the mix of rows follows dataset sizes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..preprocess.images import StoredImage
from ..preprocess.items import MMEB_IMAGE_PLACEHOLDER, Item, string_cell

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

    def dataset_names(self) -> list[str]:
        """Per example, the dataset it came from (examples are stored dataset by dataset)."""
        return [name for name, count in self.datasets.items() for _ in range(count)]


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
            # decoded as stored, as the official VLM2Vec training reads its images (a plain Image.open)
            return Item(text=text or None, image=None if image is None else StoredImage(image))
        except InputError as e:
            raise InputError(f"{where}: the {side}: {e}") from None


@dataclass(frozen=True)
class DatasetPlan:
    """How the sampler cuts one dataset into batches: the same sizes every epoch, only the rows change."""

    name: str
    rows: int
    batches: int
    distinct_targets: int
    largest_target: int  # rows sharing the most frequent target
    batch_size: int  # the batch size asked for

    @property
    def sizes(self) -> tuple[int, int]:
        """The smallest and largest batch (they differ by at most one)."""
        return self.rows // self.batches, -(-self.rows // self.batches)

    @property
    def sizes_text(self) -> str:
        low, high = self.sizes
        return f"{low}" if low == high else f"{low}-{high}"

    @property
    def limited(self) -> bool:
        """True when its targets, not the batch size, bound its batches (few labels or a dominant one)."""
        return self.batches > -(-self.rows // self.batch_size)

    def describe(self, total_rows: int, total_batches: int) -> str:
        return (
            f"{self.name} {self.rows} rows ({100 * self.rows / total_rows:.1f}%) in {self.batches} batches of "
            f"{self.sizes_text} ({100 * self.batches / total_batches:.1f}% of steps)"
        )


@dataclass(frozen=True)
class _Part:
    plan: DatasetPlan
    rows: np.ndarray  # example indices of the dataset
    codes: np.ndarray  # per row, its target's number in [0, distinct_targets)


class DistinctTargetSampler:
    """Batches of example indices: each batch from one dataset, no target twice in a batch, every example
    once per epoch.

    A repeated target in one batch would be scored as its own negative (a false negative); classification
    sets with few labels make that common. So, as VLM2Vec does, a batch never mixes datasets, and a dataset
    of n rows whose most frequent target is on c of them is cut each epoch into m = max(ceil(n / batch_size),
    c) batches: its rows grouped by target (groups and rows in a fresh random order), row j of that sequence
    to batch j mod m. No batch holds a target twice, and batch sizes differ by at most one (never above
    batch_size). A dataset with fewer distinct targets than the batch size, or with one dominant target,
    therefore gets smaller batches and more of them (two balanced labels: two rows a batch).

    The datasets' batches are interleaved by progress: each gets a random point inside its own 1/m-th of its
    dataset's epoch, and the epoch runs through those points in order. At any moment every dataset has given
    about the same fraction of its rows, so the mix of rows follows dataset sizes. Steps do not: a dataset
    cut into small batches takes more of them (`plans` says how many; the trainer logs it every epoch).

    Each epoch is a fixed function of (seed, epoch), so a position (epoch, batch index) is all a checkpoint
    needs. min_batch: the smallest batch allowed (the number of ranks: each needs a row); a dataset whose
    targets force smaller batches is an InputError naming it.
    """

    def __init__(
        self,
        targets: Sequence[Key],
        batch_size: int,
        *,
        datasets: Sequence[str] | None = None,
        seed: int = 0,
        min_batch: int = 1,
    ):
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        if not len(targets):
            raise InputError("no training examples")
        names = list(datasets) if datasets is not None else ["data"] * len(targets)
        if len(names) != len(targets):
            raise ValueError(f"{len(names)} dataset names for {len(targets)} targets")
        codes: dict[Key, int] = {}
        target_codes = np.array([codes.setdefault(t, len(codes)) for t in targets], dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self._parts: list[_Part] = []
        order: dict[str, int] = {}  # datasets in order of first appearance
        dataset_codes = np.array([order.setdefault(n, len(order)) for n in names], dtype=np.int64)
        for name, d in order.items():
            rows = np.flatnonzero(dataset_codes == d)
            _, dense, counts = np.unique(target_codes[rows], return_inverse=True, return_counts=True)
            n, largest = len(rows), int(counts.max())
            plan = DatasetPlan(name, n, max(-(-n // batch_size), largest), len(counts), largest, batch_size)
            if plan.sizes[0] < min_batch:
                raise InputError(
                    f"dataset {name!r}: its {n} rows need {plan.batches} batches to keep equal targets apart "
                    f"({len(counts)} distinct targets, the most frequent on {largest} rows), so some batches "
                    f"hold only {plan.sizes[0]} row(s): fewer than the {min_batch} ranks, each of which needs one; "
                    f"leave the dataset out or use fewer ranks"
                )
            self._parts.append(_Part(plan, rows, dense.astype(np.int64)))
        self._cache: tuple[int, list[np.ndarray]] | None = None

    @property
    def plans(self) -> list[DatasetPlan]:
        """Per dataset: rows, batches per epoch and their sizes."""
        return [p.plan for p in self._parts]

    def describe(self) -> str:
        """One line: each dataset's share of an epoch's rows and steps."""
        rows = sum(p.rows for p in self.plans)
        steps = sum(p.batches for p in self.plans)
        return "; ".join(p.describe(rows, steps) for p in self.plans)

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """The batches of one epoch: arrays of example indices, one dataset and distinct targets in each."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[np.ndarray] = []
        points: list[np.ndarray] = []
        for part in self._parts:
            m = part.plan.batches
            shuffled = rng.permutation(len(part.rows))
            group_order = rng.permutation(part.plan.distinct_targets)
            # Rows grouped by target; a group has at most m rows, so j -> j mod m puts each in another batch.
            sequence = part.rows[shuffled[np.argsort(group_order[part.codes[shuffled]], kind="stable")]]
            for k in range(m):
                batch = sequence[k::m]
                batches.append(batch[rng.permutation(len(batch))])
            points.append((rng.permutation(m) + rng.random(m)) / m)
        order = np.argsort(np.concatenate(points), kind="stable")
        batches = [batches[i] for i in order]
        self._cache = (epoch, batches)
        return batches

    def batch_at(self, epoch: int, index: int) -> tuple[np.ndarray, int, int]:
        """The batch at (epoch, index), and the position after it."""
        batches = self.epoch(epoch)
        if index >= len(batches):
            epoch, index = epoch + 1, 0
            batches = self.epoch(epoch)
        return batches[index], epoch, index + 1
