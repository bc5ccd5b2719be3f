"""Linear merge of bottleneck adapters on a base-size BERT: adapter_merging vs ``adapters`` 1.3.0.

``BertModel(BertConfig())`` (hidden 768, 12 layers, 110 M parameters, random weights: nothing is
downloaded) with three ``SeqBnConfig()`` adapters (reduction factor 16) given seeded random values;
``average_adapter("merged", names, weights=[0.5, 0.3, 0.2])`` (``combine_strategy="linear"``,
normalised). Each library in its own process, median of 5 merges; the merged tensors are saved and
compared afterwards: the linear merge of bottleneck adapters is exact in both, so they should agree to
the bit, and both equal Σ λᵢ θᵢ formed in float64 to float32 rounding.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict

from benchmarks.common import PeakRSS, in_subprocess, log_to_stderr, median

NAMES, WEIGHTS = ("b1", "b2", "b3"), (0.5, 0.3, 0.2)
QUICK_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def side(which: str, quick: bool, output: str, repeats: int = 5) -> Dict[str, Any]:
    """One library's merges; the merged adapter's tensors and the inputs' go to ``output``."""
    import adapters
    import torch
    from adapters import SeqBnConfig
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(**(QUICK_CONFIG if quick else {})))
    adapters.init(model)
    if which == "ours":
        import adapter_merging

        adapter_merging.init(model)
    generator = torch.Generator().manual_seed(1)
    for name in NAMES:
        model.add_adapter(name, config=SeqBnConfig())
    with torch.no_grad():
        for key, param in model.named_parameters():
            if any(f".{name}." in key for name in NAMES):
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    times = []
    with PeakRSS() as memory:
        for _ in range(repeats):
            start = time.perf_counter()
            model.average_adapter("merged", list(NAMES), weights=list(WEIGHTS), overwrite_ok=True)
            times.append(time.perf_counter() - start)
    tensors = {key: param.detach().clone() for key, param in model.named_parameters()
               if any(f".{name}." in key for name in (*NAMES, "merged"))}
    torch.save(tensors, output)
    parameters = sum(t.numel() for k, t in tensors.items() if ".merged." in k)
    return {"seconds": median(times), "runs_s": times, "peak_extra_mb": memory.extra_mb, "merged_parameters": parameters}


def compare(ours_file: str, adapters_file: str) -> Dict[str, Any]:
    """Bitwise agreement of the two merged adapters, and each one's error against Σ λᵢ θᵢ in float64."""
    import torch

    ours, theirs = torch.load(ours_file), torch.load(adapters_file)
    merged = [k for k in ours if ".merged." in k]
    identical = sum(int(torch.equal(ours[k], theirs[k])) for k in merged)
    out: Dict[str, Any] = {"tensors": len(merged), "bit_identical_tensors": identical,
                           "max_abs_difference": max(float((ours[k] - theirs[k]).abs().max()) for k in merged)}
    for label, tensors in (("ours", ours), ("adapters", theirs)):
        diff_sq = ref_sq = 0.0
        for key in merged:
            target = sum(w * tensors[key.replace(".merged.", f".{n}.")].double() for n, w in zip(NAMES, WEIGHTS))
            diff_sq += float(((tensors[key].double() - target) ** 2).sum())
            ref_sq += float((target**2).sum())
        out[f"{label}_relative_error"] = (diff_sq / ref_sq) ** 0.5
    return out


def run(quick: bool, log: Callable[[str], None] = log_to_stderr, timeout: float = 1800) -> Dict[str, Any]:
    result: Dict[str, Any] = {"setup": {"model": "BertModel(BertConfig(" + (", ".join(f"{k}={v}" for k, v in QUICK_CONFIG.items()) if quick else "") + "))",
                                        "adapters": "3 × SeqBnConfig() (reduction factor 16), random values",
                                        "weights": list(WEIGHTS), "strategy": "linear (normalised)"}}
    with tempfile.TemporaryDirectory() as tmp:
        files = {which: str(Path(tmp) / f"{which}.pt") for which in ("ours", "adapters")}
        for which in ("ours", "adapters"):
            log(f"bottleneck adapters on base-size BERT, linear merge: {which}")
            result[which] = in_subprocess("bottleneck", "side", dict(which=which, quick=quick, output=files[which],
                                                                     repeats=2 if quick else 5), timeout)
        if all(result[w].get("status") == "ok" for w in files):
            result["parity"] = compare(files["ours"], files["adapters"])
    return result
