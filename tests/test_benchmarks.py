"""The benchmark suite's smoke run (``python -m benchmarks.run --quick``): every section runs on tiny
shapes, its numbers are well formed and plausible, the page and the plots are written where asked,
and the committed results are never touched."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import run as suite  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def committed_files():
    files = [suite.DOCS_PAGE, suite.PUBLISHED_JSON] + sorted(suite.DOCS_IMAGES.glob("*.png"))
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.exists()}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    before = committed_files()
    code = suite.main(["--quick", "--out", str(out)])
    return code, out, json.loads((out / "results.json").read_text(encoding="utf-8")), before


def test_exit_code_and_every_section_ok(quick_run):
    code, _, results, _ = quick_run
    assert code == 0
    assert list(results["sections"]) == list(suite.SECTION_NAMES)
    assert all(section["status"] == "ok" for section in results["sections"].values()), results["sections"]
    assert results["quick"] is True and results["machine"]["cpu_count"] >= 1 and results["wall_s"] > 0


def test_task_vector_numbers(quick_run):
    section = quick_run[2]["sections"]["task_vectors"]
    assert section["ours_and_reference"]["status"] == "ok" and section["peft"]["status"] == "ok"
    for strategy in ("ties", "dare_ties", "magnitude_prune", "breadcrumbs"):
        ours = section["ours_and_reference"][strategy]["ours"]
        reference = section["ours_and_reference"][strategy]["reference"]
        assert ours["seconds"] > 0 and reference["seconds"] > 0 and ours["peak_extra_mb"] >= 0
        # the stored factors are at least the optimal truncation, and close to it
        assert ours["optimal_error"] - 1e-9 <= ours["error"] <= ours["optimal_error"] * 1.01
        assert ours["report_error"] >= ours["error"] - 1e-6  # the report is an upper bound
        assert 0 < reference["error"] < 1
    assert set(section["peft"]) - {"status", "process_wall_s"} == {"ties", "dare_ties", "magnitude_prune"}
    assert section["peft"]["ties"]["definition_gap"] > 0.1  # PEFT's TIES is another definition


def test_lora_layer_numbers(quick_run):
    point = quick_run[2]["sections"]["lora_layer"]["points"][0]
    sides = point["sides"]
    assert all(sides[s]["status"] == "ok" for s in ("ours", "adapters", "peft"))
    assert sides["ours"]["max_relative_error"] < 1e-6
    assert sides["adapters"]["max_relative_error"] == pytest.approx(2 / 3, abs=1e-3)  # adapters keeps alpha for r = 3r
    assert sides["peft"]["max_relative_error"] < 1e-4


def test_files_bottleneck_scaling_refactorisation_numbers(quick_run):
    sections = quick_run[2]["sections"]
    files = sections["files_7b"]
    assert files["lora_delta_w_svd"]["max_error"] < 1e-6 and files["ties"]["merge_s"] > 0
    assert files["lora_delta_w_svd"]["floor_s"]["total"] > 0
    parity = sections["bottleneck"]["parity"]
    assert parity["bit_identical_tensors"] == parity["tensors"] > 0
    rows = sections["scaling"]["rows"]
    assert {(r["axis"], r["strategy"]) for r in rows} == {(a, s) for a in ("adapters", "rank")
                                                           for s in ("lora_delta_w_svd", "ties")}
    assert all(r["max_error"] < 1e-6 for r in rows if r["strategy"] == "lora_delta_w_svd")
    refactor = sections["refactorisation"]["rows"]
    assert {r["method"] for r in refactor} == {"0 iterations", "1 iterations", "2 iterations", "3 iterations",
                                               "adaptive (ours)"}
    assert all(r["excess"] > -1e-6 for r in refactor)


def test_lowrank_numbers(quick_run):
    from benchmarks import lowrank_methods

    section = quick_run[2]["sections"]["lowrank"]
    assert list(section["cases"]) == ["3", "8"]
    for case in section["cases"].values():
        assert all(case[part]["status"] == "ok" for part in ("timings", "memory", "errors")), case
        for label in lowrank_methods.METHODS:
            timing, memory, error = case["timings"][label], case["memory"][label], case["errors"][label]
            assert timing["seconds"] > 0 and timing["rank"] >= 1 and memory["peak_extra_mb"] >= 0
            assert memory["largest_tensor_mb"] > 0
            if label == "ties, full":  # a truncation: at least the optimal error, and close to it
                assert error["optimal_error"] - 1e-9 <= error["error_float64"] <= error["optimal_error"] * 1.01 + 1e-9
            else:  # the dense float64 definition, to rounding
                assert error["error_float64"] < 1e-9 and error["error_float32"] < 1e-5, (label, error)


def test_page_and_plots(quick_run):
    _, out, results, _ = quick_run
    page = (out / "results.md").read_text(encoding="utf-8")
    assert page.startswith("# Benchmark results\n") and "quick: smoke-test shapes" in page
    from benchmarks import report

    for key, (title, _, image) in report.SECTIONS.items():
        assert f"## {title}" in page, title
        if image:
            assert f"![{title}]({image})" in page
            data = (out / image).read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 5000, image
    assert page.count("| `ties` |") == 3  # the task-vector, files and re-factorisation tables
    assert results["images"] == {k: v[2] for k, v in report.SECTIONS.items() if v[2]}


def test_committed_results_untouched(quick_run):
    assert committed_files() == quick_run[3]


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--publish"], "--publish replaces the committed results"),
    (["--only", "scaling", "--publish"], "--publish replaces the committed results"),
    (["--only", "everything"], "unknown section"),
    (["--out", "docs"], "would mix a run's files with committed ones"),
    (["--out", "benchmarks/results"], "would mix a run's files with committed ones"),
])
def test_refused_arguments(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as info:
        suite.parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_default_outputs_are_ignored_by_git():
    assert suite.parse_args(["--quick"]).out == suite.RESULTS_DIR / "quick.tmp"
    assert suite.parse_args([]).out == suite.RESULTS_DIR / "latest.tmp"
    assert "benchmarks/results/*.tmp" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
