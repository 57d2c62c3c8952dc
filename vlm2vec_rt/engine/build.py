"""`build_engine`: a model directory -> a checked engine directory (export, compile, parity gate, manifest).

The build writes into a temporary directory beside `out_dir` and renames it into place only after the
parity gate against eager fp32 has passed; until then its manifest says `complete: false`, so neither a
failed nor a killed build leaves a directory that loads. A build holds a lock beside `out_dir` (released by
the kernel when the process dies), so the next build into the same place knows the temporary folders a
killed one left are dead and removes them (a previous engine caught mid-replace is put back first). A build
also removes what killed builds of other names left beside it, where their lock proves them dead, and
`Engine.load` of an engine that a killed build left moved aside puts it back.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from types import ModuleType

from .. import __version__, profiles
from ..atomic import atomic_dir
from ..backbones.base import MAX_VIEWS_PER_CALL
from ..devices import default_device
from ..errors import EngineError, InputError
from ..models.backbones import load_backbone
from ..models.embedder import Embedder, directory_signature
from ..models.preprocessors import read_model_type
from .backends import CHOICES, pick_auto, require
from .export import graph_specs
from .host import write_host_assets
from .manifest import MANIFEST, PARITY_THRESHOLDS, PRECISIONS, write_manifest
from .parity import parity_items, parity_report
from .runtime import PREPROCESSOR_DIR, Engine

log = logging.getLogger("vlm2vec_rt")

# Shapes a TensorRT plan accepts (its optimisation profile); the Engine batches within them.
TRT_MAX_BATCH = 32
TRT_MAX_PATCHES = 16384  # Qwen2-VL patches of one image (1344x1344 is 9216)


def build_engine(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    precision: str = "fp16",
    backend: str = "auto",
    device: str | None = None,
    overwrite: bool = False,
    profile: str | None = None,
) -> Path:
    """Export the model at `model_dir` and compile it into an engine directory at `out_dir`.

    precision: "fp32" | "fp16" | "int8" (int8: onnxruntime, dynamic quantisation of the decoder's matmuls).
    backend: "auto" (the fastest available here for the precision) | "onnxruntime" | "tensorrt" | "aoti".
    device: what the engine runs on, "cpu" or "cuda" (default: cuda when torch sees a GPU).
    The build fails with EngineError (and writes nothing) if the engine's embeddings of generated text,
    image and image+text inputs fall below the precision's cosine threshold against eager fp32
    (fp32 0.9999, fp16 0.999, int8 0.99). An existing `out_dir` is replaced only with overwrite=True, and
    only if it is an engine directory (or empty). One build at a time into the same `out_dir`.
    profile: the input recipe the engine is built, parity-checked and recorded under (vlm2vec_rt.profiles;
    None: the model directory's recorded one, else "vlm2vec"); the engine encodes under no other.
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if backend not in CHOICES:
        raise InputError(f"backend must be one of {', '.join(CHOICES)}, got {backend!r}")
    device = device or default_device()
    if backend == "auto":
        backend = pick_auto(precision, device)
    module = require(backend, device, precision)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    backbone_name = read_model_type(model_dir)
    profile = profiles.resolve(profile, model_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(out_dir) as locked:
        if locked:
            remove_dead_leftovers(out_dir)
            remove_dead_builds(out_dir.parent, skip=out_dir.name)  # other names' killed builds too
        _check_replaceable(out_dir, overwrite)
        _build(
            model_dir,
            out_dir,
            backbone_name=backbone_name,
            module=module,
            precision=precision,
            backend=backend,
            device=device,
            overwrite=overwrite,
            profile=profile,
        )
    return out_dir


def _build(
    model_dir: Path,
    out_dir: Path,
    *,
    backbone_name: str,
    module: ModuleType,
    precision: str,
    backend: str,
    device: str,
    overwrite: bool,
    profile: str,
) -> None:
    """build_engine's work, with out_dir checked and the build lock held.

    Memory stays near one copy of the weights: the eager fp32 reference embeds the parity items first,
    then it is the export source (fp32, int8) or is freed before the fp16 copy loads; the exported graphs'
    torch modules are released as soon as the backend no longer needs them (onnxruntime: before
    compiling), and the parity gate compares against the stored reference embeddings.
    """
    t0 = time.perf_counter()
    stages = _Stages(6)
    log.info(
        "building an engine of %s: %s, %s, %s backend, profile %s",
        model_dir,
        precision,
        device,
        backend,
        profile,
    )
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with stages("loading the model (fp32, the reference)"):
            # on the engine's device: a GPU build's reference and export run there, not on the CPU
            reference = Embedder(load_backbone(model_dir, dtype="float32", device=device, profile=profile))
        with stages("reference embeddings of the parity items (eager fp32)"):
            expected = reference.encode(parity_items(), batch_size=3)
            reference.pre.save(tmp / PREPROCESSOR_DIR)
            dim, max_seq = reference.dim, reference.pre.max_length
        source = reference.backbone
        del reference
        if precision == "fp16":
            with stages("loading the model in fp16 (the fp32 copy freed)"):
                del source
                gc.collect()
                source = load_backbone(model_dir, dtype="float16", device=device, profile=profile)
        else:
            stages.skip("the fp32 model is the export source")
        write_host_assets(source, tmp, dtype="float16" if precision == "fp16" else "float32")
        specs = graph_specs(source)
        del source  # the graphs' modules hold what export needs; the backend may release them early
        described = {name: spec.describe() for name, spec in specs.items()}
        extra = {}
        limits = {}
        if backend == "tensorrt":
            limits = {
                "max_batch": TRT_MAX_BATCH,
                "max_seq": max_seq,
                "max_views": MAX_VIEWS_PER_CALL,
                "max_patches": TRT_MAX_PATCHES,
            }
            extra["limits"] = limits
        # raw exports (fp32 weights of a 7B model are 28 GB) go beside the engine, not to a small /tmp
        work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".work", dir=out_dir.parent))
        try:
            what = "exporting, quantising and compiling" if precision == "int8" else "exporting and compiling"
            with stages(f"{what} the vision and decoder graphs ({backend})"):
                files = module.build(specs, tmp, precision=precision, device=device, work_dir=work, **extra)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        del specs
        gc.collect()
        fields = {
            "backbone": backbone_name,
            "profile": profile,
            "precision": precision,
            "backend": backend,
            "device": device,
            "dim": dim,
            "graphs": {name: {"file": files[name], **described[name]} for name in described},
            "opset": _onnx_opset(tmp / files["decoder"]),
            "limits": limits,
            "preprocessor": PREPROCESSOR_DIR,
            "parity_thresholds": PARITY_THRESHOLDS,
            "versions": _versions(backend),
            "source": {
                "model_dir": os.fspath(model_dir.resolve()),
                "signature": directory_signature(model_dir),
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_manifest(tmp, fields, complete=False)

        with stages(f"parity gate against eager fp32 (cosine >= {PARITY_THRESHOLDS[precision]})"):
            engine = Engine.load(tmp, device=device, _allow_incomplete=True)
            try:
                fields["parity"] = parity_report(engine, expected, PARITY_THRESHOLDS[precision])
            finally:
                engine.close()
        with stages("hashing the engine's files into its manifest"):
            fields["build_seconds"] = round(time.perf_counter() - t0, 1)
            write_manifest(tmp, fields, complete=True)
    log.info(
        "engine written to %s in %.1f s (min cosine %.6f)",
        out_dir,
        time.perf_counter() - t0,
        fields["parity"]["min_cosine"],
    )


class _Stages:
    """The build's stages as numbered log lines with their times ("[2/6] ... (12.3 s)"): progress on the
    command line, where INFO logs are printed, and in any Python logging set-up."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    @contextlib.contextmanager
    def __call__(self, what: str):
        self.done += 1
        log.info("[%d/%d] %s ...", self.done, self.total, what)
        t = time.perf_counter()
        yield
        log.info("[%d/%d] done in %.1f s", self.done, self.total, time.perf_counter() - t)

    def skip(self, why: str) -> None:
        self.done += 1
        log.info("[%d/%d] %s", self.done, self.total, why)


def _check_replaceable(out_dir: Path, overwrite: bool) -> None:
    """An existing out_dir may be replaced only when asked to, and only if it is an engine (or empty): a
    mistyped --out must not delete someone's data."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    where = os.fspath(out_dir)
    if not overwrite:
        raise EngineError(f"{where!r} already exists (overwrite=True / --overwrite replaces it)")
    if out_dir.is_dir() and ((out_dir / MANIFEST).is_file() or not any(out_dir.iterdir())):
        return
    raise EngineError(
        f"{where!r} is not an engine directory (no {MANIFEST}) and not empty; refusing to replace it "
        "with --overwrite (choose another --out)"
    )


def _lock_file(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


def _try_lock(lock_path: Path, *, create: bool) -> int | None:
    """An fd holding the exclusive lock on lock_path, or None when a live build holds it (or, with
    create=False, when the file is gone). The previous holder may unlink the file between our open and
    flock: only the lock of the file still at lock_path counts."""
    import fcntl

    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)
        if not create:
            return None


@contextlib.contextmanager
def _build_lock(out_dir: Path):
    """Hold an exclusive lock on `.NAME.lock` beside out_dir for the build (EngineError if another build
    into out_dir holds it). The kernel drops the lock when its holder dies: holding it proves that no live
    build of out_dir exists."""
    try:
        import fcntl  # noqa: F401 - availability: POSIX only
    except ImportError:  # not POSIX: no proof that other builds are dead; build without cleaning up
        yield False
        return
    lock_path = _lock_file(out_dir)
    fd = _try_lock(lock_path, create=True)
    if fd is None:
        with contextlib.suppress(OSError), open(lock_path, "rb") as f:
            holder = f.read(32).decode(errors="replace").strip()
        raise EngineError(
            f"another build into {os.fspath(out_dir)!r} is running (pid {holder or '?'}); "
            "wait for it to finish or build elsewhere"
        )
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


_LOCK_NAME = re.compile(r"\.(.+)\.lock")


def remove_dead_builds(parent: Path, *, skip: str | None = None) -> list[Path]:
    """What killed builds of any engine in `parent` left: for each `.NAME.lock` whose lock is free (its
    build died), NAME's temporary folders (`remove_dead_leftovers`, an engine caught mid-replace put back
    first) and the lock file itself. A held lock (a live build) is left alone, and so are temporary folders
    without a lock file (another writer's, for all we know). skip: a NAME not to touch. Returns what went.
    """
    try:
        import fcntl  # noqa: F401 - availability: POSIX only
    except ImportError:
        return []
    removed: list[Path] = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return removed
    for lock_path in entries:
        match = _LOCK_NAME.fullmatch(lock_path.name)
        if match is None or match.group(1) == skip or lock_path.is_symlink() or not lock_path.is_file():
            continue
        fd = _try_lock(lock_path, create=False)
        if fd is None:
            continue
        try:
            removed += remove_dead_leftovers(parent / match.group(1))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)
            log.warning("removed %s, the lock of a killed build", lock_path)
            removed.append(lock_path)
        finally:
            os.close(fd)
    return removed


def _leftover_pattern(out_dir: Path) -> re.Pattern:
    """Names of the temporary folders a build of out_dir makes beside it: tempfile's `.NAME.RANDOM.SUFFIX`
    (atomic_dir's .tmp and .old, the export's .work). RANDOM has no dot, so no other name's folders match."""
    return re.compile(rf"\.{re.escape(out_dir.name)}\.[a-z0-9_]+\.(tmp|work|old)")


def remove_dead_leftovers(out_dir: Path) -> list[Path]:
    """Remove the temporary folders that killed builds of out_dir left beside it; call with the build
    lock held (no live build of out_dir then exists). An engine that a kill caught in the middle of being
    replaced (moved aside to .old/x, the new one not yet in place) is first put back at out_dir."""
    pattern = _leftover_pattern(out_dir)
    removed = []
    for path in sorted(out_dir.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        previous = path / "x"
        if match.group(1) == "old" and previous.exists() and not (out_dir.exists() or out_dir.is_symlink()):
            os.replace(previous, out_dir)
            log.warning("put back %s from %s (a replacing build was killed)", out_dir, path)
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s, left by a killed build", path)
        removed.append(path)
    return removed


def put_back_moved_engine(out_dir: Path) -> bool:
    """Put back the engine that an --overwrite build killed between its two renames left moved aside
    (`.NAME.*.old/x`, nothing at out_dir), when no live build of out_dir exists; the dead build's other
    folders go too. True when out_dir exists afterwards."""
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        return True
    pattern = _leftover_pattern(out_dir)
    try:
        moved = any(
            (m := pattern.fullmatch(p.name)) and m.group(1) == "old" and (p / "x").exists()
            for p in out_dir.parent.iterdir()
        )
    except OSError:
        return False
    if not moved:
        return False
    try:
        with _build_lock(out_dir) as locked:
            if locked:
                remove_dead_leftovers(out_dir)
    except EngineError:  # a live build of out_dir: it puts the engine in place itself
        return False
    return out_dir.exists()


def _onnx_opset(path: Path) -> int | None:
    if path.suffix != ".onnx":
        return None
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _versions(backend: str) -> dict[str, str]:
    import importlib.metadata as md

    names = ["torch", "transformers", "onnx", "onnxruntime"] + (["tensorrt"] if backend == "tensorrt" else [])
    out = {"vlm2vec_rt": __version__}
    for name in names:
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out
