"""`Engine`: embeddings from a built engine directory, with the Embedder's `encode` contract.

    items --Preprocessor (worker thread, one window ahead)--> token ids + pixels
          --token-budget batches (by length, split where padding costs more than a call)--> vision graph --host: pack, embed, positions--> decoder graph
          --> float32 [N, D] unit rows, in input order

The full torch model is never loaded: the graphs run in the backend (onnxruntime, TensorRT, AOTInductor),
the host side needs only the embedding table, image_newline and the config (engine/host.py).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import profiles
from ..errors import EngineError, InputError
from ..models.preprocessors import NumpyBatch, load_preprocessor
from ..preprocess.batching import DEFAULT_MAX_TOKENS, call_cost_tokens, encode_by_length
from ..preprocess.images import DEFAULT_MAX_PIXELS
from ..preprocess.items import Item, as_items
from .backends import require
from .host import HOSTS
from .manifest import MANIFEST, read_manifest, verify_files

PREPROCESSOR_DIR = "preprocessor"


class Engine:
    """A loaded engine: `encode` like `Embedder.encode`, from the engine's graphs and host side.

    >>> eng = Engine.load("engines/llava-fp16")
    >>> vecs = eng.encode(["a dog", Item(image="cat.jpg")])   # float32 [2, eng.dim], unit rows

    Thread-safe: many threads may call `encode` at once (the backends' sessions are shared).
    """

    def __init__(self, path: Path, manifest: dict, pre, host, runner, device: str):
        self.path = path
        self.manifest = manifest
        self.pre = pre
        self.host = host
        self.runner = runner
        self.device = device
        self.max_batch = int(manifest.get("limits", {}).get("max_batch") or 1 << 30)

    @classmethod
    def load(
        cls,
        engine_dir: str | os.PathLike,
        *,
        device: str = "cpu",
        num_threads: int | None = None,
        image_resolution: str | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        tiling: str | None = None,
        verify: bool = True,
        profile: str | None = None,
        _allow_incomplete: bool = False,
    ) -> Engine:
        """Check and load an engine directory built by `build_engine`.

        Checks, each an EngineError naming the problem: the manifest's format version, that the build
        finished, that the directory holds exactly the files the manifest lists (every graph and asset
        among them, none outside it), every file against its sha256 (verify=False skips the hashing of
        a trusted engine), the backend installed and able to run on `device`, the engine's profile (the
        input recipe it was built and parity-checked under) the one asked for. num_threads: the
        backend's intra-op threads (default: the cores this process may use). image_resolution,
        max_image_pixels, tiling: as for Embedder (tiling=None: the Preprocessor's default image path).
        profile: None takes the engine's own; another than the engine's is an EngineError. An engine that a
        killed --overwrite build left moved aside (nothing at engine_dir) is put back first.
        """
        path = Path(engine_dir)
        if not path.exists() and not _allow_incomplete:
            from .build import put_back_moved_engine  # build imports this module

            put_back_moved_engine(path)  # an engine a killed --overwrite build left moved aside
        manifest = read_manifest(path, allow_incomplete=_allow_incomplete)
        built_profile = engine_profile(path, manifest, profile)
        backend = manifest["backend"]
        built_for = manifest.get("device", "cpu")
        if device != built_for and backend != "onnxruntime":
            raise EngineError(
                f"{os.fspath(path)!r} is a {backend} engine built for {built_for}; rebuild it for {device}"
            )
        host_class = HOSTS.get(manifest["backbone"])
        if host_class is None:
            raise EngineError(f"{path / MANIFEST}: unknown backbone {manifest['backbone']!r}")
        module = require(backend, device)
        # what is loaded is always checked to be listed and inside the directory; the hashing is skippable
        verify_files(path, manifest, required=host_class.ASSETS, hashes=verify)
        try:
            options = {} if tiling is None else {"tiling": tiling}
            pre = load_preprocessor(
                path / PREPROCESSOR_DIR,
                image_resolution=image_resolution,
                max_image_pixels=max_image_pixels,
                profile=built_profile,
                **options,
            )
        except InputError as e:
            raise EngineError(f"engine {os.fspath(path)!r}: {e}") from None
        if pre.name != manifest["backbone"]:
            raise EngineError(
                f"{path / MANIFEST}: backbone {manifest['backbone']!r} but the preprocessor is {pre.name!r}"
            )
        host = host_class(pre, path)
        if host.hidden_size != manifest["dim"]:
            raise EngineError(
                f"{path / MANIFEST}: dim {manifest['dim']} but the embedding table has {host.hidden_size}"
            )
        runner = module.Runner(path, manifest, device, num_threads)
        return cls(path, manifest, pre, host, runner, device)

    # ---- what it is -----------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Embedding dimension (the decoder's hidden size)."""
        return int(self.manifest["dim"])

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def profile(self) -> str:
        """The input recipe the engine was built and parity-checked under (vlm2vec_rt.profiles)."""
        return self.pre.profile

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def fingerprint(self) -> str:
        """Identifies what produces these embeddings (the engine's files by hash, image path): cache keys."""
        parts = [self.manifest["backbone"], self.precision, self.backend, str(self.pre.image_resolution)]
        parts.append(self.profile)
        parts.append(str(getattr(self.pre, "tiling", "transformers")))
        parts += [f"{name}:{digest}" for name, digest in sorted(self.manifest["files"].items())]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"Engine({os.fspath(self.path)!r}, backbone={self.manifest['backbone']}, precision={self.precision}, "
            f"backend={self.backend}, device={self.device}, dim={self.dim})"
        )

    # ---- encode ---------------------------------------------------------------------------------------
    def encode(
        self,
        items: Sequence[Item | str | Any],
        *,
        batch_size: int = 16,
        progress: bool = False,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> np.ndarray:
        """Embed items (Item, str for text, PIL.Image for an image) -> float32 [N, dim], unit-norm rows.

        Items are batched by length (at most batch_size items and max_tokens padded tokens per decoder
        call, split into smaller batches where that saves more padding than a call costs); the next
        window of items is preprocessed on a worker thread while the model runs.
        """
        if self.runner is None:
            raise EngineError(f"engine {os.fspath(self.path)!r} is closed")
        return encode_by_length(
            self.pre,
            as_items(items),
            self.run_batch,
            dim=self.dim,
            # a TensorRT plan's largest batch bounds the batches, and so the window too
            batch_size=min(batch_size, self.max_batch),
            max_tokens=max_tokens,
            call_cost=call_cost_tokens(self.device, max_tokens),
            progress=progress,
        )

    def run_batch(self, batch: NumpyBatch) -> np.ndarray:
        """One collated batch through vision graph, host side and decoder graph -> [B, dim] float32."""
        runner = self.runner  # read once: close() from another thread may set it to None meanwhile
        if runner is None:
            raise EngineError(f"engine {os.fspath(self.path)!r} is closed")
        features: list[np.ndarray] = []
        if batch.pixel_values is not None:
            outputs = [runner.run("vision", feed) for feed in self.host.vision_feeds(batch)]
            features = self.host.pack(outputs, batch)
        return runner.run("decoder", self.decoder_feeds(batch, features))

    def decoder_feeds(
        self, batch: NumpyBatch, features: list[np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """The decoder graph's inputs for a collated batch and its images' packed features (host side)."""
        return {
            "inputs_embeds": self.host.inputs_embeds(batch.input_ids, features or []),
            "attention_mask": batch.attention_mask,
            "position_ids": self.host.position_ids(batch),
        }

    def close(self) -> None:
        """Release the backend's sessions now (garbage collection does it otherwise); encode then fails
        with EngineError, in this thread or any other (a call in flight fails at its next graph call)."""
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.close()


def engine_profile(path: Path, manifest: dict, asked: str | None) -> str:
    """The profile an engine runs under: its manifest's, which a profile asked for must equal (EngineError)."""
    built = manifest.get("profile")
    if built is None:
        raise EngineError(
            f"{os.fspath(path)!r} was built before pipeline profiles, with inputs that differ from the official "
            "VLM2Vec code's for Qwen2-VL: rebuild it with `vlm2vec-rt build`"
        )
    if built not in profiles.PROFILES:
        raise EngineError(
            f"{path / MANIFEST}: unknown profile {built!r} (known: {', '.join(profiles.PROFILES)})"
        )
    if asked is not None and asked != built:
        profiles.check_profile(asked)
        raise EngineError(
            f"{os.fspath(path)!r} was built under profile {built!r}; it cannot encode under {asked!r} "
            f"(build another engine with --profile {asked})"
        )
    return built
