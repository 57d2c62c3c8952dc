"""The command line: tiny and embed end to end, one clear line and a non-zero exit on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlm2vec_rt import Embedder, Item
from vlm2vec_rt.cli import build_parser, main


def test_every_command_has_help(capsys):
    for command in ("tiny", "train", "merge", "build", "embed", "eval", "bench", "quickstart", "serve"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        assert "usage: vlm2vec-rt " + command in capsys.readouterr().out


def test_tiny_then_embed(tmp_path, photos, capsys):
    model = tmp_path / "model"
    assert (
        main(
            ["tiny", "--backbone", "qwen2_vl", "--out", str(model), "--hidden-size", "32", "--num-heads", "2"]
        )
        == 0
    )
    image = tmp_path / "cat.png"
    Image.fromarray(photos["chelsea"]).save(image)
    out = tmp_path / "one.npy"
    assert (
        main(
            [
                "embed",
                "--model",
                str(model),
                "--image",
                str(image),
                "--text",
                "a cat",
                "--instruction",
                "Represent the given image.",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    vec = np.load(out, allow_pickle=False)
    want = Embedder.from_pretrained(model).encode(
        [Item(image=str(image), text="a cat", instruction="Represent the given image.")]
    )
    np.testing.assert_allclose(vec, want, atol=1e-6)

    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps(r) for r in [{"text": "a dog"}, {"image": "cat.png"}]) + "\n")
    out2 = tmp_path / "many.npy"
    assert main(["embed", "--model", str(model), "--input", str(items), "--out", str(out2)]) == 0
    assert np.load(out2).shape == (2, 32)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["embed", "--model", "{tmp}/nope", "--text", "x", "--out", "{tmp}/o.npy"], "does not exist"),
        (
            ["embed", "--model", "{model}", "--image", "{tmp}/missing.png", "--out", "{tmp}/o.npy"],
            "does not exist",
        ),
        (["embed", "--model", "{model}", "--out", "{tmp}/o.npy"], "give --text"),
        (["embed", "--model", "{model}", "--text", "", "--out", "{tmp}/o.npy"], "neither text nor image"),
        (["tiny", "--out", "{tmp}/m", "--hidden-size", "63"], "multiple of num_heads"),
    ],
)
def test_bad_input_is_one_line(tmp_path, tiny_qwen, capsys, argv, match):
    argv = [a.format(tmp=tmp_path, model=tiny_qwen) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and err.count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "o.npy").exists()


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert (
        main(["embed", "--debug", "--model", str(tmp_path), "--text", "x", "--out", str(tmp_path / "o.npy")])
        == 2
    )
    assert "Traceback" in capsys.readouterr().err


def test_parser_matches_api_md():
    parser = build_parser()
    args = parser.parse_args(["build", "--model", "m", "--engine", "fp16", "--out", "o"])
    assert (args.engine, args.backend) == ("fp16", "auto")
    args = parser.parse_args(["train", "--model", "m", "--data", "d", "--out", "o", "--resume"])
    assert args.resume and args.temperature == 0.02


def test_embed_at_high_resolution(tmp_path, tiny_llava, photos):
    image = tmp_path / "cat.png"
    Image.fromarray(photos["chelsea"]).save(image)
    out = tmp_path / "high.npy"
    argv = [
        "embed",
        "--model",
        tiny_llava,
        "--image",
        str(image),
        "--image-resolution",
        "high",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    want = Embedder.from_pretrained(tiny_llava, image_resolution="high").encode([Item(image=str(image))])
    np.testing.assert_allclose(np.load(out), want, atol=1e-6)


def test_profile_flag_wherever_a_model_is_read(tmp_path, tiny_qwen, photos, capsys):
    parser = build_parser()
    for command in (
        ["embed", "--model", "m", "--text", "t", "--out", "o.npy"],
        ["eval", "--model", "m", "--out", "o"],
        ["build", "--model", "m", "--engine", "fp32", "--out", "o"],
        ["train", "--model", "m", "--data", "d", "--out", "o"],
        ["merge", "--model", "m", "--adapter", "a", "--out", "o"],
    ):
        assert parser.parse_args([*command, "--profile", "native"]).profile == "native"
        assert parser.parse_args(command).profile is None  # resolved later: a record, else vlm2vec
    image = tmp_path / "cat.png"
    Image.fromarray(photos["chelsea"]).save(image)
    out = tmp_path / "native.npy"
    args = ["embed", "--model", tiny_qwen, "--image", str(image), "--text", "a cat", "--out", str(out)]
    assert main([*args, "--profile", "native"]) == 0
    item = Item(image=str(image), text="a cat")
    native = Embedder.from_pretrained(tiny_qwen, profile="native").encode([item])
    np.testing.assert_allclose(np.load(out), native, atol=1e-6)
    assert float((np.load(out) * Embedder.from_pretrained(tiny_qwen).encode([item])).sum()) < 0.9999
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*args, "--profile", "gme"])
    assert e.value.code == 2 and "invalid choice: 'gme'" in capsys.readouterr().err
