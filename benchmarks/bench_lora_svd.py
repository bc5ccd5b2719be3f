"""LoRA delta-W SVD merge: adapter_merging vs adapters 1.3.0 vs peft, on the same adapters.

Setup (the defaults): a Llama-shaped model (hidden 2048, intermediate 5632, 2 layers, 16 heads and
16 key/value heads, vocabulary 128), three LoRA adapters of rank 16 (alpha 16) with random non-zero
A and B (seeded, identical values in every library), on every module ``adapters`` puts LoRA on with
``LoRAConfig(selfattn_lora=True, attn_matrices=["q", "k", "v"], intermediate_lora=True,
output_lora=True)``: per layer ``self_attn.q_proj``, ``k_proj``, ``v_proj`` (2048 × 2048),
``mlp.up_proj`` (5632 × 2048) and ``mlp.down_proj`` (2048 × 5632), 10 modules in all (``adapters``
1.3.0 has no LoRA for ``o_proj`` or ``gate_proj`` of Llama). Merge: weights [1, −1, 1],
``normalize_weights=False``, ``svd_rank=48`` (= Σ rᵢ, the exact rank).

Each library runs in its own subprocess (``--side``) so that timings and peak memory do not
interfere; only the merge call is timed. Afterwards, and not timed, each side compares its merged
adapter's effective update (its own scaling × B·A) with the exact target Σ λᵢ sᵢ Bᵢ Aᵢ formed
densely in float64, module by module.

    python benchmarks/bench_lora_svd.py --threads 1        # → results/bench_lora_svd.json
    python benchmarks/bench_lora_svd.py                    # → results/bench_lora_svd_default_threads.json
    python benchmarks/bench_lora_svd.py --quick            # small shapes, a smoke test → results/*.tmp
    python benchmarks/bench_lora_svd.py --sides ours,adapters --timeout 900

The two committed results files hold only the reference run (the default setup, every library,
with ``--threads 1`` or torch's default threads respectively). Any other run — ``--quick``, other
shapes, ranks, weights, a subset of ``--sides``, another thread count — writes to an ignored
``results/*.tmp`` file unless ``--output`` names another file, and is refused if ``--output``
names a committed results file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script too

from benchmarks.common import RESULTS_DIR, PeakRSS, format_ratio, machine_info, random_factors  # noqa: E402

#: the committed results: torch threads of the reference run → its file
COMMITTED = {1: RESULTS_DIR / "bench_lora_svd.json", None: RESULTS_DIR / "bench_lora_svd_default_threads.json"}
NAMES = ["lora_1", "lora_2", "lora_3"]
SIDES = ("ours", "adapters", "peft")
MODULES = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


# ============================================================================ one side (subprocess)
def canonical(path: str) -> str:
    """'layers.<i>.<self_attn|mlp>.<proj>' from any library's module path."""
    match = re.search(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)$", path)
    if not match:
        raise ValueError(f"unexpected LoRA module path {path}")
    return f"layers.{match.group(1)}.{match.group(2)}.{match.group(3)}"


def llama(args):
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=128,
    )
    model = LlamaModel(config)
    model.eval()
    return model


def relative_errors(items):
    """items: [(path, merged_delta, target_delta)] float64 → per-module and overall errors."""
    import torch

    per_module, diff_sq, ref_sq = {}, 0.0, 0.0
    for path, merged, target in items:
        d = float(torch.linalg.matrix_norm(merged - target)) ** 2
        t = float(torch.linalg.matrix_norm(target)) ** 2
        per_module[path] = math.sqrt(d / t)
        diff_sq, ref_sq = diff_sq + d, ref_sq + t
    return per_module, math.sqrt(diff_sq / ref_sq)


def run_adapters_side(args, ours: bool) -> dict:
    import adapters
    import torch
    from adapters import LoRAConfig

    model = llama(args)
    adapters.init(model)
    config = LoRAConfig(
        r=args.rank, alpha=args.alpha, selfattn_lora=True, attn_matrices=["q", "k", "v"],
        intermediate_lora=True, output_lora=True,
    )
    for name in NAMES:
        model.add_adapter(name, config=config)
    layers = {p: m for p, m in model.named_modules() if hasattr(m, "loras") and NAMES[0] in m.loras}
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            for path, module in layers.items():
                lora = module.loras[name]
                b, a = random_factors(i, canonical(path), args.rank, *lora.lora_B.shape[:1], lora.lora_A.shape[1])
                lora.lora_A.copy_(a)
                lora.lora_B.copy_(b)
    report = None
    if ours:
        import adapter_merging

        adapter_merging.init(model)
    times = []
    with PeakRSS() as memory:
        for _ in range(args.repeat if ours else 1):  # adapters' own merge takes minutes: once
            start = time.perf_counter()
            result = model.average_adapter(
                "merged", NAMES, weights=args.weights, combine_strategy="lora_delta_w_svd",
                normalize_weights=False, svd_rank=args.svd_rank, overwrite_ok=True,
            )
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    if ours:
        report = result
    # ---- not timed: the dense float64 reference
    items = []
    for path, module in layers.items():
        target = sum(
            w * module.loras[n].scaling * (module.loras[n].lora_B.double() @ module.loras[n].lora_A.double())
            for n, w in zip(NAMES, args.weights)
        )
        merged = module.loras["merged"]
        items.append((canonical(path), merged.scaling * (merged.lora_B.double() @ merged.lora_A.double()), target))
    per_module, overall = relative_errors(items)
    merged_config = model.adapters_config.get("merged")
    out = {
        "seconds": seconds,
        "seconds_all_runs": times,
        "peak_extra_rss_mb": memory.extra_mb,
        "max_relative_error": max(per_module.values()),
        "overall_relative_error": overall,
        "relative_error_per_module": per_module,
        "merged_r": merged_config["r"],
        "merged_alpha": merged_config["alpha"],
        "modules": sorted(per_module),
    }
    if report is not None:
        out["report_max_error"] = report.max_error
        out["report_summary"] = report.summary()
    return out


def run_peft_side(args) -> dict:
    import peft
    import torch
    from peft import LoraConfig, get_peft_model

    model = llama(args)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=list(MODULES), lora_dropout=0.0)
    model = get_peft_model(model, config, adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.add_adapter(name, config)
    layers = {p: m for p, m in model.named_modules() if hasattr(m, "lora_A") and NAMES[0] in m.lora_A}
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            for path, module in layers.items():
                weight_a, weight_b = module.lora_A[name].weight, module.lora_B[name].weight
                b, a = random_factors(i, canonical(path), args.rank, weight_b.shape[0], weight_a.shape[1])
                weight_a.copy_(a)
                weight_b.copy_(b)
    with PeakRSS() as memory:
        start = time.perf_counter()
        model.add_weighted_adapter(
            NAMES, args.weights, adapter_name="merged", combination_type="svd", svd_rank=args.svd_rank
        )
        seconds = time.perf_counter() - start
    items = []
    for path, module in layers.items():
        def delta(name):
            return module.scaling[name] * (
                module.lora_B[name].weight.double() @ module.lora_A[name].weight.double()
            )

        target = sum(w * delta(n) for n, w in zip(NAMES, args.weights))
        items.append((canonical(path), delta("merged"), target))
    per_module, overall = relative_errors(items)
    return {
        "seconds": seconds,
        "peak_extra_rss_mb": memory.extra_mb,
        "max_relative_error": max(per_module.values()),
        "overall_relative_error": overall,
        "relative_error_per_module": per_module,
        "merged_r": model.peft_config["merged"].r,
        "merged_alpha": model.peft_config["merged"].lora_alpha,
        "peft_version": peft.__version__,
        "modules": sorted(per_module),
    }


def side_main(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.side == "peft":
        result = run_peft_side(args)
    else:
        result = run_adapters_side(args, ours=args.side == "ours")
    print("RESULT " + json.dumps(result))


# ============================================================================ driver
def run_side(side: str, args) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--side", side,
        "--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--layers", str(args.layers),
        "--rank", str(args.rank), "--alpha", str(args.alpha), "--svd-rank", str(args.svd_rank),
        "--weights", ",".join(str(w) for w in args.weights), "--repeat", str(args.repeat),
    ] + (["--threads", str(args.threads)] if args.threads else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"[{side}] running ...", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": args.timeout}
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"status": "failed", "returncode": done.returncode, "stderr_tail": done.stderr[-2000:]}
    result = json.loads(lines[-1][len("RESULT "):])
    result["status"] = "ok"
    result["subprocess_wall_s"] = wall
    print(f"[{side}] merge {result['seconds']:.3f} s, error {result['max_relative_error']:.3e}", flush=True)
    return result


def table(results: dict) -> str:
    ours = results.get("ours", {})
    rows = [
        ("library", "merge time (s)", "time / ours", "peak extra RSS (MB)", "max rel. error", "overall rel. error",
         "r / alpha")
    ]
    labels = {
        "ours": "adapter_merging", "adapters": "adapters (own average_adapter)", "peft": "peft add_weighted_adapter",
    }
    for side, result in results.items():
        if result.get("status") != "ok":
            rows.append((labels[side], result.get("status", "?"), "", "", "", "", ""))
            continue
        ratio = result["seconds"] / ours["seconds"] if ours.get("status") == "ok" else float("nan")
        rows.append((
            labels[side], f"{result['seconds']:.3f}", format_ratio(ratio) if side != "ours" else "1×",
            f"{result['peak_extra_rss_mb']:.0f}", f"{result['max_relative_error']:.2e}",
            f"{result['overall_relative_error']:.2e}", f"{result['merged_r']} / {result['merged_alpha']}",
        ))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


#: the reference setup; only a run of exactly this setup may write a committed results file
REFERENCE = {"quick": False, "hidden": 2048, "intermediate": 5632, "layers": 2, "rank": 16, "alpha": 16,
             "svd_rank": 48, "weights": [1.0, -1.0, 1.0], "repeat": 5}
QUICK_SHAPES = {"hidden": 256, "intermediate": 704}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of ours,adapters,peft")
    parser.add_argument("--hidden", type=int, default=REFERENCE["hidden"])
    parser.add_argument("--intermediate", type=int, default=REFERENCE["intermediate"])
    parser.add_argument("--layers", type=int, default=REFERENCE["layers"])
    parser.add_argument("--rank", type=int, default=REFERENCE["rank"])
    parser.add_argument("--alpha", type=int, default=REFERENCE["alpha"])
    parser.add_argument("--svd-rank", type=int, default=REFERENCE["svd_rank"])
    parser.add_argument("--weights", type=lambda s: [float(x) for x in s.split(",")], default=REFERENCE["weights"])
    parser.add_argument("--timeout", type=int, default=900, help="seconds per side")
    parser.add_argument("--repeat", type=int, default=REFERENCE["repeat"],
                        help="runs of our merge (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every side (default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="hidden 256, intermediate 704: a smoke test; writes an ignored results/*.tmp file")
    parser.add_argument("--output", type=Path, default=None,
                        help="results file (default: the committed file of a reference run, else results/*.tmp)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate = QUICK_SHAPES["hidden"], QUICK_SHAPES["intermediate"]
    return args


def is_reference_run(args: argparse.Namespace) -> bool:
    """The reference setup (every library, default shapes, ranks, weights and repeats) with 1 or
    torch's default threads: the only runs the committed results files hold."""
    sides = sorted(s for s in args.sides.split(",") if s)
    setup = {key: getattr(args, key) for key in REFERENCE}
    return setup == REFERENCE and sides == sorted(SIDES) and args.threads in COMMITTED


def output_path(args: argparse.Namespace) -> Path:
    """Where the driver writes its results. A reference run: its committed file (or ``--output``).
    Any other run: ``--output``, by default an ignored ``results/bench_lora_svd[_quick].json.tmp``;
    it may not name a committed file (SystemExit)."""
    committed = {path.resolve() for path in COMMITTED.values()}
    if args.output is None:
        if is_reference_run(args):
            return COMMITTED[args.threads]
        return RESULTS_DIR / ("bench_lora_svd_quick.json.tmp" if args.quick else "bench_lora_svd_other.json.tmp")
    target = args.output.resolve()
    if target in committed and not (is_reference_run(args) and target == COMMITTED[args.threads].resolve()):
        raise SystemExit(
            f"refusing to write {args.output}: the committed results files hold only the reference run "
            "(default setup, every library; bench_lora_svd.json with --threads 1, "
            "bench_lora_svd_default_threads.json with torch's default threads). Pass another --output."
        )
    return args.output


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.side:
        side_main(args)
        return
    output = output_path(args)  # before the minutes of work: a refused --output fails at once
    sides = [s for s in args.sides.split(",") if s]
    info = machine_info()
    setup = {
        "model": f"LlamaModel hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
                 "16 heads, 16 kv heads, vocab 128, float32",
        "adapters": f"3 LoRA, r {args.rank}, alpha {args.alpha}, random non-zero A and B (seeded)",
        "lora_modules_per_layer": [f"self_attn.{m}" for m in MODULES[:3]] + [f"mlp.{m}" for m in MODULES[3:]],
        "adapters_config": "LoRAConfig(r, alpha, selfattn_lora=True, attn_matrices=['q','k','v'], "
                           "intermediate_lora=True, output_lora=True)",
        "peft_config": f"LoraConfig(r, lora_alpha, target_modules={list(MODULES)})",
        "merge": {"weights": args.weights, "normalize_weights": False, "svd_rank": args.svd_rank,
                  "combine_strategy": "lora_delta_w_svd (peft: combination_type='svd', defaults)"},
        "error": "relative Frobenius error of the merged adapter's effective update (its scaling × B·A) "
                 "against Σ λᵢ sᵢ Bᵢ Aᵢ formed densely in float64; per module (max) and over all modules",
        "timing": "wall time of the merge call only, each library in its own subprocess; ours: median of "
                  f"{args.repeat} runs, the others: one run",
        "torch_threads": args.threads or "torch default",
    }
    results = {side: run_side(side, args) for side in sides}
    info["load_average_at_end"] = list(os.getloadavg())
    text = table(results)
    print()
    print(text)
    ours = results.get("ours", {})
    summary = {}
    for side in ("adapters", "peft"):
        if results.get(side, {}).get("status") == "ok" and ours.get("status") == "ok":
            summary[f"speedup_vs_{side}"] = results[side]["seconds"] / ours["seconds"]
    if summary:
        print("\n" + ", ".join(f"{k}: {format_ratio(v)}" for k, v in summary.items()))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps({"machine": info, "setup": setup, "results": results, "summary": summary, "table": text},
                   indent=2, ensure_ascii=False) + "\n"
    )
    resolved = output.resolve()
    print(f"\nwrote {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else output}")


if __name__ == "__main__":
    main()
