"""The bundled mini benchmark: real images from installed packages, in the official MMEB layouts.

`write_bundled(root, seed=0)` writes (deterministically, atomically, once: a later call with the
same seed reuses it after checking every file's hash) a held-out evaluation split in the MMEB-eval
layout and a training split in the MMEB-train layout:

    root/eval/<Dataset>/test-00000-of-00001.parquet      qry_text, qry_img_path, tgt_text, tgt_img_path
    root/eval/eval_images/<Dataset>/...png               (eval image paths are relative to eval_images/)
    root/train/<Dataset>/original-00000-of-00001.parquet qry, qry_image_path, pos_text, pos_image_path,
                                                         neg_text, neg_image_path
    root/train/images/<Dataset>/Train/...png             (train image paths, "images/<Dataset>/Train/x.png",
                                                         are relative to train/, as in MMEB-train)

Tasks (texts written the way MMEB writes them: "<|image_1|>\\n" + instruction + text + "\\n"):

  Digits       Classification, IND. scikit-learn's 8x8 handwritten digits upscaled to 32x32. A digit image
               -> its label word among all 10 ("zero" ... "nine"). Eval: 200 queries (20 per class),
               10 candidates. Train: 1000 rows (100 per class), different digit samples, no hard negative.
  Photos_t2i   Retrieval, IND. 20 real photos (scikit-learn, scikit-image) with a caption each. A caption
               -> a 64x64 crop of its photo among crops of 9 other photos. Eval: 60 queries (3 crops per
               photo), 10 candidates. Train: 160 rows (8 other crops per photo), a hard-negative crop.
  Photos_i2t   Retrieval, IND. A crop -> its photo's caption among 10 captions. Eval: 60 queries, 10
               candidates. Train: 160 rows, a hard-negative caption.
  PhotoPairs   Retrieval (image -> image), OOD: no training split. A crop -> another crop of the same
               photo among crops of 9 other photos. Eval: 60 queries, 10 candidates.

Candidate lists are far shorter than MMEB's (10 rather than up to 1000) so a tiny model's scores are
readable and the whole evaluation takes seconds. Train and eval never share an image file: digits are
split by sample, and each photo's train and eval crops are different random square crops (random
position, 50-85% of the shorter side, random mirror), so the photo tasks measure generalisation to new
views of the 20 scenes, the digits to new handwriting samples.
Needs the `data` extra (scikit-learn, scikit-image).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import atomic
from ..errors import InputError
from ..preprocess.items import Item
from .registry import BUNDLED_DATASETS, IMAGE_TARGET_INSTRUCTION, PHOTO_CANDIDATES

BUNDLED_VERSION = 1
_MANIFEST = "bundled.json"
_FORMAT = "vlm2vec-rt/bundled-benchmark"

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_SIDE = 32  # pixels: 8x8 digits upscaled
PHOTO_SIDE = 64  # pixels: square photo crops
DIGITS_EVAL_PER_CLASS = 20
DIGITS_TRAIN_PER_CLASS = 100
PHOTO_EVAL_CROPS = 3
PHOTO_TRAIN_CROPS = 8
# the instructions of the bundled datasets' queries (the registry declares them)
_CLASSIFY = BUNDLED_DATASETS["Digits"].instruction
_T2I = BUNDLED_DATASETS["Photos_t2i"].instruction
_I2T = BUNDLED_DATASETS["Photos_i2t"].instruction
_I2I = BUNDLED_DATASETS["PhotoPairs"].instruction

TRAIN_DATASETS = ("Digits", "Photos_t2i", "Photos_i2t")

# Captions of the two scikit-learn photos (scikit-image's come with vlm2vec_rt.sample_images).
_EXTRA_CAPTIONS = {
    "china": "a temple with a curved roof among green trees",
    "flower": "a close view of a flower in bloom",
}


@dataclass(frozen=True)
class BundledPaths:
    """Where write_bundled put things.

    train_dir: MMEB-train layout (<Dataset>/original-00000-of-00001.parquet).
    train_images: the root the training rows' image paths are relative to (the same folder as
    train_dir, as in MMEB-train where images.zip unzips into images/ beside the dataset folders).
    eval_dir: MMEB-eval layout (<Dataset>/test-00000-of-00001.parquet); eval_images: eval_dir/eval_images,
    the default image root of `evaluate`.
    """

    root: Path
    train_dir: Path
    train_images: Path
    eval_dir: Path
    eval_images: Path


def default_bundled_root(seed: int = 0) -> Path:
    """Where `vlm2vec-rt eval` keeps the bundled benchmark: $VLM2VEC_RT_CACHE, else
    $XDG_CACHE_HOME/vlm2vec-rt, else ~/.cache/vlm2vec-rt; a folder per version and seed."""
    base = os.environ.get("VLM2VEC_RT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vlm2vec-rt"
    )
    return Path(base) / f"bundled-v{BUNDLED_VERSION}-seed{seed}"


def bundled_paths(root: str | os.PathLike) -> BundledPaths:
    root = Path(root)
    return BundledPaths(root, root / "train", root / "train", root / "eval", root / "eval" / "eval_images")


def write_bundled(root: str | os.PathLike | None = None, *, seed: int = 0) -> BundledPaths:
    """Write the bundled benchmark into root (default: default_bundled_root(seed)) and return its paths.

    BundledPaths.train_dir: MMEB-train layout, <Dataset>/original-00000-of-00001.parquet for Digits,
    Photos_t2i and Photos_i2t (columns qry, qry_image_path, pos_text, pos_image_path, neg_text,
    neg_image_path; image paths relative to train_images, which is train_dir itself).
    BundledPaths.eval_dir: MMEB-eval layout, <Dataset>/test-00000-of-00001.parquet for Digits, Photos_t2i,
    Photos_i2t and PhotoPairs (images relative to eval_images = eval_dir/eval_images); pass it to
    `evaluate`. Sizes and tasks: see the module docstring (10 candidates per query; 200 + 3x60 eval
    queries; 1000 + 2x160 training rows; no image file shared between the splits).
    Deterministic for a given seed and package versions; written atomically (a killed call leaves
    nothing); cached: when root already holds this version and seed with every file intact it is
    returned as is (a damaged copy is rewritten). A root holding anything else is never overwritten
    (InputError). Needs scikit-learn and scikit-image (the `data` extra).
    """
    root = Path(root) if root is not None else default_bundled_root(seed)
    state = _existing(root, seed)
    if state == "valid":
        return bundled_paths(root)
    if state == "foreign":
        raise InputError(
            f"{os.fspath(root)!r} exists and is not a bundled benchmark directory; choose another folder"
        )
    try:
        with atomic.atomic_dir(root, overwrite=True) as tmp:
            _generate(tmp, seed)
    except FileExistsError:  # pragma: no cover - another process finished first
        pass
    if _existing(root, seed) != "valid":  # pragma: no cover - defensive
        raise InputError(f"writing the bundled benchmark to {os.fspath(root)!r} failed")
    return bundled_paths(root)


def _existing(root: Path, seed: int) -> str:
    """'absent', 'valid', 'stale' (ours, other version/seed or damaged: rewritten) or 'foreign'."""
    if not root.exists():
        return "absent"
    manifest = root / _MANIFEST
    if not manifest.is_file():
        return "foreign" if not root.is_dir() or any(root.iterdir()) else "absent"
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return "stale"
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        return "foreign"
    if meta.get("version") != BUNDLED_VERSION or meta.get("seed") != seed:
        return "stale"
    for rel, digest in meta.get("files", {}).items():
        f = root / rel
        if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != digest:
            return "stale"
    return "valid"


# ---- generation --------------------------------------------------------------------------------------
def _mmeb_text(instruction: str, text: str | None = None, *, image: bool) -> str:
    """A text the way MMEB files hold it (Item.format_text: placeholder, instruction, text, newline)."""
    return Item(text=text, image="image" if image else None, instruction=instruction).format_text()


class _Writer:
    """Collects PNG files and parquet tables in a folder, remembering each file's hash for the manifest."""

    def __init__(self, root: Path):
        self.root = root
        self.hashes: dict[str, str] = {}
        self.pixels: dict[str, str] = {}  # pixel hash -> relative path (train/eval disjointness)

    def png(self, rel: str, pixels: np.ndarray) -> None:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
        self._put(rel, buf.getvalue())

    def parquet(self, rel: str, columns: dict[str, list], types: dict[str, object]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({k: pa.array(v, type=types[k]) for k, v in columns.items()})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self._put(rel, buf.getvalue())

    def _put(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)  # inside the atomic directory: complete or never renamed into place
        self.hashes[rel] = hashlib.sha256(data).hexdigest()


def _resize(pixels: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).resize((side, side), Image.Resampling.BICUBIC))


def _random_crop(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = photo.shape[:2]
    side = max(8, int(round(min(h, w) * rng.uniform(0.5, 0.85))))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    crop = photo[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return _resize(np.ascontiguousarray(crop), PHOTO_SIDE)


def _photo_crops(seed: int) -> tuple[list[str], dict[str, str], dict[str, list], dict[str, list]]:
    """(names, captions, eval crops per photo, train crops per photo); no crop appears in both splits."""
    from ..sample_images import SKIMAGE_PHOTOS, photos

    images = photos()
    captions = {**_EXTRA_CAPTIONS, **SKIMAGE_PHOTOS}
    names = [n for n in images if n in captions]
    eval_rng = np.random.default_rng([seed, 2, 0])
    train_rng = np.random.default_rng([seed, 2, 1])
    eval_crops = {n: [_random_crop(images[n], eval_rng) for _ in range(PHOTO_EVAL_CROPS)] for n in names}
    seen = {c.tobytes() for crops in eval_crops.values() for c in crops}
    train_crops: dict[str, list] = {}
    for n in names:
        crops = []
        while len(crops) < PHOTO_TRAIN_CROPS:
            c = _random_crop(images[n], train_rng)
            if c.tobytes() not in seen:  # never the same pixels as an eval crop
                seen.add(c.tobytes())
                crops.append(c)
        train_crops[n] = crops
    return names, captions, eval_crops, train_crops


def _generate(out: Path, seed: int) -> None:
    import pyarrow as pa

    from ..sample_images import digits

    w = _Writer(out)
    s, ls = pa.string(), pa.list_(pa.string())
    eval_types = {"qry_text": s, "qry_img_path": s, "tgt_text": ls, "tgt_img_path": ls}
    train_types = {
        k: s for k in ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
    }
    sizes: dict[str, dict[str, int]] = {}

    def eval_png(dataset: str, name: str, pixels: np.ndarray) -> str:
        rel = f"{dataset}/{name}.png"
        w.png(f"eval/eval_images/{rel}", pixels)
        return rel

    def train_png(dataset: str, name: str, pixels: np.ndarray) -> str:
        rel = f"images/{dataset}/Train/{name}.png"
        w.png(f"train/{rel}", pixels)
        return rel

    def write_eval(dataset: str, rows: list[tuple[str, str, list[str], list[str]]]) -> None:
        cols = dict(zip(eval_types, map(list, zip(*rows))))
        w.parquet(f"eval/{dataset}/test-00000-of-00001.parquet", cols, eval_types)
        sizes.setdefault(dataset, {})["eval_queries"] = len(rows)

    def write_train(dataset: str, rows: list[tuple[str, ...]]) -> None:
        cols = dict(zip(train_types, map(list, zip(*rows))))
        w.parquet(f"train/{dataset}/original-00000-of-00001.parquet", cols, train_types)
        sizes.setdefault(dataset, {})["train_rows"] = len(rows)

    # Digits: stratified split by sample, eval first.
    images, labels = digits()
    rng = np.random.default_rng([seed, 1])
    qry = _mmeb_text(_CLASSIFY, image=True)
    eval_rows, train_rows = [], []
    for label in range(10):
        idx = rng.permutation(np.nonzero(labels == label)[0])
        others = [DIGIT_WORDS[k] for k in range(10) if k != label]
        for i in idx[:DIGITS_EVAL_PER_CLASS]:
            path = eval_png("Digits", f"digit_{int(i):04d}", _resize(images[i], DIGIT_SIDE))
            eval_rows.append((int(i), (qry, path, [DIGIT_WORDS[label], *others], [""] * 10)))
        for i in idx[DIGITS_EVAL_PER_CLASS : DIGITS_EVAL_PER_CLASS + DIGITS_TRAIN_PER_CLASS]:
            path = train_png("Digits", f"digit_{int(i):04d}", _resize(images[i], DIGIT_SIDE))
            train_rows.append((int(i), (qry, path, DIGIT_WORDS[label], "", "", "")))
    # Interleave the classes (rows ordered by sample index), as a real dataset would be.
    write_eval("Digits", [r for _, r in sorted(eval_rows)])
    write_train("Digits", [r for _, r in sorted(train_rows)])

    # Photos: 20 scenes, eval and train crops.
    names, captions, eval_crops, train_crops = _photo_crops(seed)
    eval_paths = {n: [eval_png("Photos", f"{n}_{j}", c) for j, c in enumerate(eval_crops[n])] for n in names}
    train_paths = {
        n: [train_png("Photos", f"{n}_{j}", c) for j, c in enumerate(train_crops[n])] for n in names
    }
    rng = np.random.default_rng([seed, 3])
    image_tgt = _mmeb_text(IMAGE_TARGET_INSTRUCTION, image=True)
    t2i, i2t, pairs = [], [], []
    k = PHOTO_CANDIDATES - 1
    for n in names:
        rest = [m for m in names if m != n]
        for j, path in enumerate(eval_paths[n]):
            negs = [rest[i] for i in rng.permutation(len(rest))[:k]]
            neg_crops = [eval_paths[m][int(rng.integers(PHOTO_EVAL_CROPS))] for m in negs]
            t2i.append(
                (_mmeb_text(_T2I, captions[n], image=False), "", [image_tgt] * (k + 1), [path, *neg_crops])
            )
            negs = [rest[i] for i in rng.permutation(len(rest))[:k]]
            i2t.append(
                (
                    _mmeb_text(_I2T, image=True),
                    path,
                    [captions[n], *(captions[m] for m in negs)],
                    [""] * (k + 1),
                )
            )
            negs = [rest[i] for i in rng.permutation(len(rest))[:k]]
            neg_crops = [eval_paths[m][int(rng.integers(PHOTO_EVAL_CROPS))] for m in negs]
            positive = eval_paths[n][(j + 1) % PHOTO_EVAL_CROPS]
            pairs.append((_mmeb_text(_I2I, image=True), path, [image_tgt] * (k + 1), [positive, *neg_crops]))
    write_eval("Photos_t2i", t2i)
    write_eval("Photos_i2t", i2t)
    write_eval("PhotoPairs", pairs)

    t2i_train, i2t_train = [], []
    for n in names:
        rest = [m for m in names if m != n]
        for path in train_paths[n]:
            m = rest[int(rng.integers(len(rest)))]
            neg = train_paths[m][int(rng.integers(PHOTO_TRAIN_CROPS))]
            t2i_train.append(
                (_mmeb_text(_T2I, captions[n], image=False), "", image_tgt, path, image_tgt, neg)
            )
            m = rest[int(rng.integers(len(rest)))]
            i2t_train.append((_mmeb_text(_I2T, image=True), path, captions[n], "", captions[m], ""))
    write_train("Photos_t2i", t2i_train)
    write_train("Photos_i2t", i2t_train)

    manifest = {
        "format": _FORMAT,
        "version": BUNDLED_VERSION,
        "seed": seed,
        "datasets": {name: {**BUNDLED_DATASETS[name].__dict__, **sizes[name]} for name in BUNDLED_DATASETS},
        "files": dict(sorted(w.hashes.items())),
    }
    atomic.write_json(out / _MANIFEST, manifest)
