"""`vlm2vec-rt bench`'s runner: every script's results and failures reach SUMMARY.md, and one broken script
does not hide the others'. The scripts themselves are benchmarks (bench/), not tests; stand-ins run here."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from vlm2vec_rt import benchmarks
from vlm2vec_rt.errors import InputError

SCRIPTS = {
    "bench_good.py": """
import json

def main(out):
    results = {"failures": [], "ratio": 2.5}
    (out / "good.json").write_text(json.dumps(results))
    return results

def summary(results):
    return [f"good: {results['ratio']:.1f}x eager"]
""",
    "bench_wrong.py": """
import json

def main(out):
    results = {"failures": ["top-k Q=3: wrong result"]}
    (out / "wrong.json").write_text(json.dumps(results))
    return results

def summary(results):
    return ["wrong: measured anyway"]
""",
    "bench_broken.py": """
def main(out):
    raise RuntimeError("the broken one")
""",
}


@pytest.fixture
def bench_folder(tmp_path, monkeypatch):
    folder = tmp_path / "bench"
    folder.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "bench" / "common.py", folder / "common.py")
    for name, text in SCRIPTS.items():
        (folder / name).write_text(text)
    monkeypatch.setattr(benchmarks, "bench_dir", lambda: folder)
    monkeypatch.setattr(benchmarks, "BENCHMARKS", ("good", "broken", "wrong"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("bench_good", "bench_wrong", "bench_broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return folder


def test_summary_has_every_script_and_every_failure(bench_folder, tmp_path, capsys):
    out = tmp_path / "results"
    assert benchmarks.run_benchmarks("all", out) == 1
    summary = (out / "SUMMARY.md").read_text()
    assert summary.startswith("# Benchmark summary")
    assert "cores" in summary and "torch" in summary  # the machine and versions
    assert "- good: 2.5x eager" in summary and (out / "good.json").is_file()
    assert "FAILED: RuntimeError: the broken one" in summary
    assert "- wrong: measured anyway" in summary and "FAILED CHECK: top-k Q=3: wrong result" in summary
    assert "failed: broken, wrong" in capsys.readouterr().err


def test_one_benchmark_refreshes_its_section_and_keeps_the_others(bench_folder, tmp_path):
    out = tmp_path / "results"
    assert benchmarks.run_benchmarks("good", out) == 0
    summary = (out / "SUMMARY.md").read_text()
    assert "good: 2.5x eager" in summary and "wrong" not in summary
    benchmarks.run_benchmarks("all", out)
    (out / "good.json").write_text('{"failures": [], "ratio": 3.0}')  # a rerun elsewhere changed it
    assert benchmarks.run_benchmarks("wrong", out) == 1
    summary = (out / "SUMMARY.md").read_text()
    assert "## good (earlier run, " in summary and "good: 3.0x eager" in summary
    assert "FAILED CHECK: top-k Q=3: wrong result" in summary
    assert "broken" not in summary  # it left no results behind
    assert summary.index("## good") < summary.index("## wrong")  # the order of BENCHMARKS


def test_summary_only_runs_nothing(bench_folder, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "good.json").write_text('{"failures": [], "ratio": 4.0}')  # the script was run on its own
    assert benchmarks.run_benchmarks("summary", out) == 0
    summary = (out / "SUMMARY.md").read_text()
    assert "## good (earlier run, " in summary and "good: 4.0x eager" in summary
    assert "broken" not in summary and not (out / "wrong.json").exists()  # nothing ran


def test_unknown_benchmark_is_an_input_error(bench_folder, tmp_path):
    with pytest.raises(InputError, match="unknown benchmark 'nope'"):
        benchmarks.run_benchmarks("nope", tmp_path)
