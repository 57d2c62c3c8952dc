"""The quickstart (`make demo`) end to end with small settings: every stage, the final table, reruns."""

from __future__ import annotations

import json

import pytest

from vlm2vec_rt import quickstart

SMALL = dict(
    training=dict(quickstart.TRAINING, steps=4, batch_size=8, checkpoint_every=2),
    engines=("fp32",),
    speed_items=8,
    speed_repeats=1,
    latency_items=2,
)


def test_quickstart_end_to_end_then_reuse_after_an_interruption(tmp_path, capsys, monkeypatch):
    out = tmp_path / "qs"
    # Ctrl-C during the engine build: nothing half-built may stay behind, and a rerun must finish.
    import vlm2vec_rt.engine.build as build_module

    real_build = build_module.build_engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "build_engine", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quickstart.run_quickstart(out, **SMALL)
    assert (out / "train" / "adapter" / "adapter_config.json").is_file()
    assert not (out / "engines" / "fp32").exists()
    monkeypatch.setattr(build_module, "build_engine", real_build)
    capsys.readouterr()

    assert quickstart.run_quickstart(out, **SMALL) == 0
    printed = capsys.readouterr().out
    assert "[1/8]" in printed and "[8/8]" in printed
    assert printed.count("reused what was already built") >= 4  # model, data, untrained eval, training, merge
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["precision_at_1"]
    assert set(runs) == {"untrained (eager)", "trained (eager)", "engine fp32"}
    assert runs["engine fp32"] == runs["trained (eager)"]  # the fp32 engine embeds like eager
    assert set(summary["speed"]) == {"eager", "engine fp32"}
    assert summary["speed"]["eager"]["vs_eager"] == 1.0
    assert "Precision@1" in (out / "SUMMARY.md").read_text()

    # A third run rebuilds nothing.
    assert quickstart.run_quickstart(out, **SMALL) == 0
    printed = capsys.readouterr().out
    assert printed.count("reused what was already built") == 7  # every stage but the speed measurement
