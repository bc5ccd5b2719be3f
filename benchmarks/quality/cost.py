"""The cost of learning merge weights on the quality benchmark's model, each measurement in a fresh process:

    python -m benchmarks.quality.cost learn --threads 2 --config '{"init": 0.25, "lr": 0.05, "budget": 40}'
    python -m benchmarks.quality.cost step --threads 2

Both load all-MiniLM-L6-v2 with one LoRA adapter (r 8, alpha 16) and one head per task — the B factors
seeded random instead of trained, so that no training run raises the process's peak memory first (the
learning's arithmetic does not depend on the values) — and draw the same batches as the benchmark's
learned rows (``learned.draw``: 32 labelled train examples per task). Then ``learn`` runs learn_weights
(granularity, method and objective as given) and ``step`` one training step of one adapter and its head on
the same batches (forward and backward of each, gradients accumulated, then AdamW's step), both in eval mode
(no dropout). Printed as one JSON line: the wall seconds and the peak resident memory
(``resource.getrusage(...).ru_maxrss``) after loading and at the end, in MiB.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from benchmarks.quality.data import TASK_NAMES

#: the benchmark's sizes (run.FULL) for the tasks and their splits
PER_CLASS = 250


def peak_mib() -> float:
    """The process's peak resident memory so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(tasks: Sequence[str], examples: int, per_class: int = PER_CLASS):
    """(model, batches): the model with one seeded-random LoRA adapter and one head per task, and the learned
    rows' batches."""
    import torch
    from adapters import LoRAConfig

    from benchmarks.quality.data import load_tasks
    from benchmarks.quality.learned import draw
    from benchmarks.quality.train import encode, load_model

    loaded = load_tasks(list(tasks), per_class=per_class, validation_share=0.08, test_share=0.24)
    model, tokenizer = load_model()
    data = {n: {"train": encode(tokenizer, t.train)} for n, t in loaded.items()}
    generator = torch.Generator().manual_seed(0)
    for name in tasks:
        model.add_adapter(name, config=LoRAConfig(r=8, alpha=16))
        model.add_classification_head(name, num_labels=2)
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if "lora_B" in key:
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()
    return model, draw(data, list(tasks), "train", examples, 0)


def learn(model, tasks: Sequence[str], batches: List[Dict[str, Any]], args) -> Dict[str, Any]:
    from adapter_merging import learn_weights

    if args.objective == "entropy":
        batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    learned = learn_weights(model, list(tasks), batches, strategy="lora_delta_w_svd", granularity=args.granularity,
                            method=args.method, objective=args.objective, adapter_name="merged", progress=False,
                            **json.loads(args.config))
    return {"seconds": learned.seconds, "evaluations": learned.evaluations}


def step(model, tasks: Sequence[str], batches: List[Dict[str, Any]], args) -> Dict[str, Any]:
    import torch

    started = time.perf_counter()
    model.train_adapter(tasks[0])
    model.eval()  # as learn_weights runs: no dropout
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(parameters, lr=1e-3)
    for batch in batches:
        model(**batch).loss.backward()
    optimiser.step()
    return {"seconds": time.perf_counter() - started, "trained_parameters": sum(p.numel() for p in parameters)}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("learn", "step"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", default=",".join(TASK_NAMES))
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=PER_CLASS)
    parser.add_argument("--granularity", default="layer")
    parser.add_argument("--method", default="gradient")
    parser.add_argument("--objective", default="loss")
    parser.add_argument("--config", default="{}", help="learn_weights' init, lr, budget as JSON")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    model, batches = load(tasks, args.examples, args.per_class)
    loaded = peak_mib()
    result = (learn if args.what == "learn" else step)(model, tasks, batches, args)
    result.update({"what": args.what, "threads": args.threads, "tasks": len(tasks),
                   "peak_loaded_mib": loaded, "peak_mib": peak_mib()})
    result["increase_mib"] = result["peak_mib"] - loaded
    if args.what == "learn":
        result.update({"granularity": args.granularity, "method": args.method, "objective": args.objective,
                       "config": json.loads(args.config)})
    print(json.dumps(result))
    return 0


def measure(config: Dict[str, Any], tasks: Sequence[str], threads: int = 2, examples: int = 32,
            per_class: int = PER_CLASS, timeout: float = 1800, learn_threads: Sequence[int] = ()) -> Dict[str, Any]:
    """Both measurements (learn_weights per layer, gradient, loss at ``config``; one training step), each in
    its own fresh process, one after the other, with ``threads`` torch threads; and their ratios. Each of
    ``learn_threads`` adds one more learning run with that many threads (``learn_<n>_threads``)."""
    import os
    import subprocess

    from benchmarks.common import ROOT

    out: Dict[str, Any] = {}
    runs = [("learn", threads), ("step", threads)] + [("learn", n) for n in learn_threads]
    for what, n in runs:
        key = what if n == threads else f"{what}_{n}_threads"
        command = [sys.executable, "-m", "benchmarks.quality.cost", what, "--threads", str(n), "--tasks",
                   ",".join(tasks), "--examples", str(examples), "--per-class", str(per_class),
                   "--config", json.dumps(config)]
        load_before = os.getloadavg()[0]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{what} failed: {done.stderr[-2000:]}")
        out[key] = json.loads(done.stdout.strip().splitlines()[-1])
        out[key]["load_average"] = [load_before, os.getloadavg()[0]]  # 1-minute, before and after: other work
    out["peak_ratio"] = out["learn"]["peak_mib"] / out["step"]["peak_mib"]
    out["increase_ratio"] = out["learn"]["increase_mib"] / max(out["step"]["increase_mib"], 1e-9)
    return out


if __name__ == "__main__":
    sys.exit(main())
