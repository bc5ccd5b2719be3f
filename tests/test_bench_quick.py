"""benchmarks/bench_lora_svd.py: ratio formatting and where a run writes (nothing heavy is run)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_lora_svd", ROOT / "benchmarks" / "bench_lora_svd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "ratio, text",
    [(0.42, "0.42×"), (0.0421, "0.042×"), (1.0, "1.0×"), (3.14, "3.1×"), (9.96, "10×"), (31.4, "31×"),
     (318.24, "318×"), (float("nan"), "n/a")],
)
def test_format_ratio(bench, ratio, text):
    assert bench.format_ratio(ratio) == text


def test_table_shows_ratios_below_one(bench):
    results = {
        "ours": {"status": "ok", "seconds": 1.0, "peak_extra_rss_mb": 1, "max_relative_error": 0.0,
                 "overall_relative_error": 0.0, "merged_r": 48, "merged_alpha": 48},
        "peft": {"status": "ok", "seconds": 0.42, "peak_extra_rss_mb": 1, "max_relative_error": 0.0,
                 "overall_relative_error": 0.0, "merged_r": 48, "merged_alpha": 48},
    }
    assert "0.42×" in bench.table(results)


def test_committed_results_exist(bench):
    for path in bench.COMMITTED.values():
        assert path.is_file() and path.parent == ROOT / "benchmarks" / "results"


def test_quick_run_never_writes_committed_results(bench):
    committed = {p.resolve() for p in bench.COMMITTED.values()}
    for extra in ([], ["--threads", "1"]):
        path = bench.output_path(bench.parse_args(["--quick", *extra]))
        assert path.resolve() not in committed
        assert path.parent == ROOT / "benchmarks" / "results" and path.name.endswith(".tmp")  # git-ignored
    for committed_file in bench.COMMITTED.values():
        for extra in ([], ["--threads", "1"]):
            with pytest.raises(SystemExit, match="refusing"):
                bench.output_path(bench.parse_args(["--quick", *extra, "--output", str(committed_file)]))


@pytest.mark.parametrize("argv", [["--sides", "ours"], ["--hidden", "512"], ["--threads", "3"], ["--repeat", "2"]])
def test_other_runs_do_not_write_committed_results(bench, argv):
    committed = {p.resolve() for p in bench.COMMITTED.values()}
    assert bench.output_path(bench.parse_args(argv)).resolve() not in committed
    with pytest.raises(SystemExit, match="refusing"):
        bench.output_path(bench.parse_args([*argv, "--output", str(bench.COMMITTED[None])]))


def test_reference_runs_write_their_committed_file(bench):
    assert bench.output_path(bench.parse_args(["--threads", "1"])) == bench.COMMITTED[1]
    assert bench.output_path(bench.parse_args([])) == bench.COMMITTED[None]
    with pytest.raises(SystemExit, match="refusing"):  # the 1-thread file holds a 1-thread run only
        bench.output_path(bench.parse_args(["--output", str(bench.COMMITTED[1])]))
    elsewhere = ROOT / "benchmarks" / "results" / "mine.json.tmp"
    assert bench.output_path(bench.parse_args(["--quick", "--output", str(elsewhere)])) == elsewhere
