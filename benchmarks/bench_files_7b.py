"""Merging a 7B-shaped set of saved LoRA adapters from files, against the floor of the same work done plainly.

Setup: three PEFT-format LoRA adapters generated into a temporary folder (random, seeded; nothing is
downloaded): 32 layers × q, k, v, o (4096 × 4096), gate, up (11008 × 4096) and down (4096 × 11008),
rank 16, alpha 16, float32, 224 modules and 160 MB per adapter. Merge: ``lora_delta_w_svd`` at the exact rank
(48), weights [1, −1, 1], ``normalize_weights=False``.

Measured in one run, the floor and the merge interleaved ``--repeats`` times (medians):

* **merge** — ``merge_saved_adapters`` (read, merge, measure, write the output folder and its report);
* **floor** — the same work done plainly: read every input with ``safetensors.torch.load_file``; per
  module a float64 factored SVD (two thin QRs and the 48 × 48 core SVD) and the output factors;
  write them with ``safetensors.torch.save_file`` — each part timed;
* **CLI** — ``python -m adapter_merging`` on the same inputs, in a subprocess: its wall time (Python,
  torch and adapters start-up included) and its peak resident memory, also net of an import-only run;
* the merged adapter's largest relative error against the exact target, from the report.

Runs (``--strategies``): ``lora_delta_w_svd``; ``ties`` (density 0.2, in full space: dense updates); and
``ties_core``, the same ``ties`` with ``space="core"`` (Core Space, issue 18: the target is at most 2× the
``lora_delta_w_svd`` time of the same run, reported as ``over_lora_delta_w_svd``; its floor is
``lora_delta_w_svd``'s, the factored SVD).

    python -m benchmarks.bench_files_7b                 # prints the table
    python -m benchmarks.bench_files_7b --quick         # 2 layers: a smoke test (seconds)
    python -m benchmarks.bench_files_7b --save          # also → benchmarks/results/bench_files_7b.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "bench_files_7b.json"
HIDDEN, INTERMEDIATE, RANK, ALPHA = 4096, 11008, 16, 16
#: module → (d, k) of its update ΔW = B·A (out × in)
SHAPES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
WEIGHTS = [1.0, -1.0, 1.0]


def generate(folder: Path, layers: int, hidden_scale: int = 1) -> List[Path]:
    """Three PEFT-format LoRA folders, as PEFT's save_pretrained writes them."""
    from safetensors.torch import save_file

    folders = []
    for i in range(3):
        generator = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(layers):
            for module, (d, k) in SHAPES.items():
                d, k = d // hidden_scale, k // hidden_scale
                prefix = f"base_model.model.model.layers.{layer}.{module}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, k, generator=generator) / k**0.5
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(d, RANK, generator=generator) * 0.01
        out = folder / f"lora_{i}"
        out.mkdir(parents=True)
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": sorted({m.split(".")[1] for m in SHAPES}),
                  "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "fan_in_fan_out": False,
                  "task_type": "CAUSAL_LM", "bias": "none", "base_model_name_or_path": None}
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        folders.append(out)
    return folders


def timed_floor(folders: List[Path], out: Path, compute) -> Dict[str, float]:
    """Read every file (``load_file``), ``compute(inputs) -> {key: tensor}``, write (``save_file``);
    each part timed, in seconds, and their total."""
    from safetensors.torch import load_file, save_file

    times = {}
    start = time.perf_counter()
    inputs = [load_file(str(f / "adapter_model.safetensors")) for f in folders]
    times["read"] = time.perf_counter() - start
    start = time.perf_counter()
    merged = compute(inputs)
    times["compute"] = time.perf_counter() - start
    start = time.perf_counter()
    out.mkdir(parents=True)
    save_file(merged, str(out / "adapter_model.safetensors"))
    times["write"] = time.perf_counter() - start
    times["total"] = times["read"] + times["compute"] + times["write"]
    return times


def lora_a_keys(inputs: List[Dict[str, torch.Tensor]]) -> List[str]:
    """The ``lora_A`` keys of the first input (each names one module)."""
    return [k for k in inputs[0] if k.endswith("lora_A.weight")]


def floor(folders: List[Path], out: Path) -> Dict[str, float]:
    """Read, factored SVD per module, write — plainly, each part timed."""
    def compute(inputs):
        scaling = ALPHA / RANK
        merged = {}
        for key in lora_a_keys(inputs):
            b_key = key.replace("lora_A", "lora_B")
            b_cat = torch.cat([w * scaling * x[b_key].double() for w, x in zip(WEIGHTS, inputs)], dim=1)
            a_cat = torch.cat([x[key].double() for x in inputs], dim=0)
            q_b, r_b = torch.linalg.qr(b_cat)
            q_a, r_a = torch.linalg.qr(a_cat.T)
            u, s, vh = torch.linalg.svd(r_b @ r_a.T)
            root = (s / scaling).sqrt()
            merged[b_key] = ((q_b @ u) * root).float().contiguous()
            merged[key] = (root[:, None] * (vh @ q_a.T)).float().contiguous()
        return merged

    return timed_floor(folders, out, compute)


def peak_rss_mb(args: List[str]) -> Tuple[float, float]:
    """(wall seconds, peak resident memory in MB) of a subprocess (its own, read by /usr/bin/time-like
    getrusage in a wrapper, so that earlier children do not count)."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:]); w = time.perf_counter() - t; "
               "print(w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(r.returncode)")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", wrapper, *args], env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{args[:4]} failed: {result.stderr}")
    wall, peak = result.stdout.split()[-2:]
    return float(wall), float(peak)


def cli(folders: List[Path], out: Path, run: str = "lora_delta_w_svd") -> Dict[str, float]:
    """The command line in a subprocess: wall time, peak resident memory, and the peak of the same
    process that only imports the package and exits (what Python, torch and adapters take)."""
    strategy, options = RUNS[run]
    flags = [part for name, value in options.items() for part in (f"--{name.replace('_', '-')}", str(value))]
    args = [sys.executable, "-m", "adapter_merging", *[f"{f}:{w}" for f, w in zip(folders, WEIGHTS)], "--no-normalize",
            "-s", strategy, *flags, "-o", str(out), "-q"]
    wall, peak = peak_rss_mb(args)
    _, baseline = peak_rss_mb([sys.executable, "-c", "import adapter_merging.cli, adapter_merging.files"])
    return {"wall": wall, "peak_rss_mb": peak, "import_only_rss_mb": baseline, "extra_mb": peak - baseline}


def ties_floor(folders: List[Path], out: Path) -> Dict[str, float]:
    """The arithmetic no dense task-vector merge avoids, done plainly: read; per module each ΔWᵢ = sᵢBᵢAᵢ
    formed once (float32) and summed, and one randomized range finder on the d × k sum (the four products
    of rank 48 + 10 with one power iteration, no selection, no masks); write the factors."""
    def compute(inputs):
        scaling, rank = ALPHA / RANK, 3 * RANK
        generator = torch.Generator().manual_seed(0)
        merged = {}
        for key in lora_a_keys(inputs):
            b_key = key.replace("lora_A", "lora_B")
            dense = torch.zeros(inputs[0][b_key].shape[0], inputs[0][key].shape[1])
            for w, x in zip(WEIGHTS, inputs):
                dense.addmm_(x[b_key], x[key], alpha=w * scaling)
            omega = torch.randn(dense.shape[1], rank + 10, generator=generator)
            q = torch.linalg.qr(dense @ omega).Q
            q = torch.linalg.qr(dense @ torch.linalg.qr(dense.T @ q).Q).Q
            u, s, vh = torch.linalg.svd(q.T @ dense, full_matrices=False)
            merged[b_key] = ((q @ u[:, :rank]) * s[:rank]).contiguous()
            merged[key] = vh[:rank].contiguous()
        return merged

    return timed_floor(folders, out, compute)


#: what each run merges: (combine_strategy, its options)
RUNS = {
    "lora_delta_w_svd": ("lora_delta_w_svd", {}),
    "ties": ("ties", {}),
    "ties_core": ("ties", {"space": "core"}),
}
#: the floor each run is compared with (Core Space's: the factored SVD, the work lora_delta_w_svd does)
FLOORS = {"lora_delta_w_svd": floor, "ties": ties_floor, "ties_core": floor}


def measure(layers: int, scale: int, repeats, strategies=("lora_delta_w_svd",), with_cli: bool = True,
            log=print) -> dict:
    """Generate the set, then per strategy its floor and the merge interleaved ``repeats`` times (an int,
    or a dict by strategy; medians), and (``with_cli``) the command line once per strategy."""
    from adapter_merging import merge_saved_adapters

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        folders = generate(tmp / "inputs", layers, scale)
        out["generate_s"] = round(time.perf_counter() - start, 2)
        out["input_mb"] = round(sum(f.stat().st_size for d in folders for f in d.iterdir()) / 2**20, 1)
        for strategy in strategies:
            floors, merges = [], []
            runs = repeats[strategy] if isinstance(repeats, dict) else repeats
            for repeat in range(runs):  # interleaved, so that the machine's load hits both alike
                log(f"7B-shaped set from files, {strategy}: floor and merge, run {repeat + 1} of {runs}")
                floors.append(FLOORS[strategy](folders, tmp / f"floor_{strategy}{repeat}"))
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # ties' truncation warning is expected at rank Σ rᵢ
                    name, options = RUNS[strategy]
                    report = merge_saved_adapters(folders, tmp / f"merged_{strategy}{repeat}", weights=WEIGHTS,
                                                  combine_strategy=name, normalize_weights=False, progress=False,
                                                  **options)
                merges.append(time.perf_counter() - start)
                shutil.rmtree(tmp / f"floor_{strategy}{repeat}")
                shutil.rmtree(tmp / f"merged_{strategy}{repeat}")
            plain = {key: statistics.median(f[key] for f in floors) for key in floors[0]}
            merge_seconds = statistics.median(merges)
            result = {
                "floor_s": {k: round(v, 3) for k, v in plain.items()},
                "merge_s": round(merge_seconds, 3),
                "merge_runs_s": [round(m, 3) for m in merges],
                "floor_runs_s": [round(f["total"], 3) for f in floors],
                "merge_over_floor": round(merge_seconds / plain["total"], 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "max_error": report.max_error,
                "rank": report.rank,
                "modules": len(report.modules),
            }
            if with_cli:
                log(f"7B-shaped set from files, {strategy}: the command line")
                result["cli"] = {k: round(v, 2) for k, v in cli(folders, tmp / f"cli_{strategy}", strategy).items()}
                shutil.rmtree(tmp / f"cli_{strategy}")
            out[strategy] = result
    if "ties_core" in out and "lora_delta_w_svd" in out:  # issue 18's target: at most 2×
        out["ties_core"]["over_lora_delta_w_svd"] = round(out["ties_core"]["merge_s"] / out["lora_delta_w_svd"]["merge_s"], 2)
    return out


def suite(quick: bool) -> dict:
    """The benchmark suite's section (``python -m benchmarks.run``), in its own process: every run
    (`RUNS`) on the 7B-shaped set (quick: 2 layers at 1/16 size, no command line)."""
    from benchmarks.common import log_to_stderr

    layers, scale = (2, 16) if quick else (32, 1)
    measured = measure(layers, scale, 1 if quick else {"lora_delta_w_svd": 3, "ties": 2, "ties_core": 3},
                       ("lora_delta_w_svd", "ties", "ties_core"), with_cli=not quick, log=log_to_stderr)
    measured["setup"] = {"layers": layers, "hidden_scale": scale, "rank": RANK, "alpha": ALPHA, "inputs": 3,
                         "weights": WEIGHTS, "modules_per_layer": list(SHAPES), "format": "PEFT (safetensors)"}
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers, quarter-size matrices (a smoke test)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the floor and the merge, interleaved (medians)")
    parser.add_argument("--strategies", default="lora_delta_w_svd", help=f"comma-separated, of {', '.join(FLOORS)}")
    parser.add_argument("--save", action="store_true", help=f"write the result to {RESULT.relative_to(ROOT)}")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers, scale = (2, 4) if args.quick else (args.layers, 1)
    strategies = [s for s in args.strategies.split(",") if s]
    measured = measure(layers, scale, args.repeats, strategies)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "system": platform.platform()},
        "setup": {"layers": layers, "rank": RANK, "inputs": 3, "input_mb": measured["input_mb"], "quick": args.quick},
        "generate_s": measured["generate_s"],
        "repeats": args.repeats,
    }
    for strategy in strategies:
        got = measured[strategy]
        plain, command = got["floor_s"], got["cli"]
        print(f"{strategy}: {layers} layers, {got['modules']} modules, 3 inputs of {measured['input_mb'] / 3:.0f} MB, "
              f"rank {RANK} → {got['rank']}")
        print(f"  floor   read {plain['read']:.2f} s + compute {plain['compute']:.2f} s + write {plain['write']:.2f} s "
              f"= {plain['total']:.2f} s (median of {args.repeats})")
        print(f"  merge   {got['merge_s']:.2f} s (median of {args.repeats}) = {got['merge_over_floor']:.2f}× the floor; "
              f"max relative error {got['max_error']:.2e}")
        if "over_lora_delta_w_svd" in got:
            print(f"          = {got['over_lora_delta_w_svd']:.2f}× lora_delta_w_svd's merge in this run (target ≤ 2×)")
        print(f"  CLI     {command['wall']:.2f} s wall (start-up included), peak RSS {command['peak_rss_mb']:.0f} MB, "
              f"of which {command['extra_mb']:.0f} MB above an import-only run")
    if strategies == ["lora_delta_w_svd"]:  # the committed file's schema: that strategy's numbers at the top level
        result.update({k: v for k, v in measured["lora_delta_w_svd"].items() if k != "modules"})
        result["setup"]["modules"] = measured["lora_delta_w_svd"]["modules"]
    else:
        result["strategies"] = {s: measured[s] for s in strategies}
    if args.save:
        RESULT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"saved {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
