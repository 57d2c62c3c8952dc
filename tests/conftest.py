"""Shared fixtures: tiny models of both backbones (written once per session) and real sample images."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Two cores on CI: more threads than cores only thrash.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> str:
    from vlm2vec_rt.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "llava_next", "llava_next", seed=0))


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> str:
    from vlm2vec_rt.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "qwen2_vl", "qwen2_vl", seed=0))


@pytest.fixture(scope="session")
def tiny_qwen25(tmp_path_factory) -> str:
    from vlm2vec_rt.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "qwen2_5_vl", "qwen2_5_vl", seed=0))


@pytest.fixture(scope="session")
def tiny_phi3v(tmp_path_factory) -> str:
    from vlm2vec_rt.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "phi3_v", "phi3_v", seed=0))


# every registered backbone, and the fixture that writes its tiny model
TINY_FIXTURES = {
    "llava_next": "tiny_llava",
    "qwen2_vl": "tiny_qwen",
    "qwen2_5_vl": "tiny_qwen25",
    "phi3_v": "tiny_phi3v",
}


@pytest.fixture(scope="session", params=list(TINY_FIXTURES))
def tiny_model(request) -> str:
    """Each backbone in turn."""
    return request.getfixturevalue(TINY_FIXTURES[request.param])


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    from vlm2vec_rt.sample_images import photos

    return photos()


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture()
def assert_encode_cleans_up(monkeypatch):
    """check(encode_call): encode_call (an Embedder's or Engine's encode whose model step raises
    RuntimeError("model step failed")) must leave no prepare-ahead worker and a closed progress bar, even
    while the traceback (which keeps encode's frame) is still held."""
    import threading

    from vlm2vec_rt.preprocess import batching

    closed = []
    real_bar = batching.progress_bar

    def spy_bar(*args, **kwargs):
        bar = real_bar(*args, **kwargs)
        real_close = bar.close
        bar.close = lambda: (closed.append(True), real_close())
        return bar

    def prep_threads():
        return {t for t in threading.enumerate() if t.name.startswith("vlm2vec-prep")}

    monkeypatch.setattr(batching, "progress_bar", spy_bar)

    def check(encode_call) -> None:
        before = prep_threads()
        with pytest.raises(RuntimeError, match="model step failed") as excinfo:
            encode_call()
        assert excinfo.traceback  # still held here
        assert not (prep_threads() - before)
        assert closed

    return check
