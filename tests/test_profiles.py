"""Profiles: names, records beside models, and which one applies when none is asked for."""

from __future__ import annotations

import json
import logging

import pytest

from vlm2vec_rt import InputError, profiles


def test_recipes():
    assert profiles.DEFAULT_PROFILE == "vlm2vec"
    qwen = profiles.recipe("vlm2vec", "qwen2_vl")
    assert (
        not qwen.vision_markers and not qwen.mrope and qwen.pixel_limits is None and qwen.text_style == "v1"
    )
    v2 = profiles.recipe("vlm2vec-v2", "qwen2_vl")
    assert v2.pixel_limits == (3136, 1003520) and v2.small_image == (28, (56, 56)) and v2.text_style == "v2"
    assert profiles.recipe("vlm2vec-v2", "llava_next").pixel_limits is None
    native = profiles.recipe("native", "qwen2_vl")
    assert native.vision_markers and native.mrope
    assert not profiles.recipe("native", "llava_next").mrope
    with pytest.raises(InputError, match="profile must be one of vlm2vec, vlm2vec-v2, native"):
        profiles.recipe("gme", "qwen2_vl")


def test_resolve_and_records(tmp_path, caplog):
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    model.mkdir()
    adapter.mkdir()
    assert profiles.resolve(None, adapter, model) == "vlm2vec"  # nothing recorded: the default
    profiles.write_record(model, "native")
    assert profiles.resolve(None, adapter, model) == "native"
    profiles.write_record(adapter, "vlm2vec-v2")
    assert profiles.resolve(None, adapter, model) == "vlm2vec-v2"  # the adapter's record comes first
    assert profiles.resolve(None, None, model) == "native"
    with caplog.at_level(logging.WARNING, logger="vlm2vec_rt"):
        assert profiles.resolve("vlm2vec", adapter, model) == "vlm2vec"  # asked: used, with a warning
    assert "trained under 'vlm2vec-v2'" in caplog.text
    (model / profiles.RECORD_FILE).write_text("{not json")
    with pytest.raises(InputError, match="vlm2vec_rt.json: not a valid profile record"):
        profiles.recorded_profile(model)
    (model / profiles.RECORD_FILE).write_text(json.dumps({"profile": "gme"}))
    with pytest.raises(InputError, match="unknown profile 'gme'"):
        profiles.recorded_profile(model)
    with pytest.raises(InputError, match="profile must be one of"):
        profiles.write_record(model, "gme")
