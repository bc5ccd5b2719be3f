"""End-to-end demo: train two LoRA adapters on a tiny BERT, merge them every way, print what changed.

Run with ``python -m adapter_merging.demo``. Offline, CPU, well under a minute. The tasks are
synthetic token-classification problems (does the sequence contain token set A? set B?), so the
numbers show the mechanics: merged adapters keep both skills, a negative weight unlearns one, and
the report says what each LoRA strategy cost against the exact target Σ λᵢ ΔWᵢ. Finally the
unlearning merge is done again from saved adapter folders (``merge_saved_adapters``).
"""
from __future__ import annotations

import os
import tempfile
import textwrap
import warnings

import torch
from adapters import AutoAdapterModel, LoRAConfig
from transformers import BertConfig

import adapter_merging

VOCAB, LENGTH, HIDDEN = 64, 12, 48
TASKS = {"task_a": range(4, 12), "task_b": range(12, 20)}


def make_data(marker_tokens, n: int, generator: torch.Generator):
    """Sequences of random filler tokens; label 1 iff one of ``marker_tokens`` appears."""
    ids = torch.randint(20, VOCAB, (n, LENGTH), generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    markers = torch.tensor(list(marker_tokens))
    for row in torch.nonzero(labels).flatten():
        pos = torch.randint(1, LENGTH, (1,), generator=generator)
        ids[row, pos] = markers[torch.randint(len(markers), (1,), generator=generator)]
    return ids, labels


def accuracy(model, data, head: str) -> float:
    ids, labels = data
    with torch.no_grad():
        logits = model(ids, head=head).logits
    return float((logits.argmax(-1) == labels).float().mean())


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=32,
    )
    return adapter_merging.init(AutoAdapterModel.from_config(config))


def train(model, name: str, data, steps: int = 300) -> None:
    model.add_adapter(name, config=LoRAConfig(r=4, alpha=8, selfattn_lora=True, output_lora=True))
    model.add_classification_head(name, num_labels=2)
    model.train_adapter(name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = data
    for step in range(steps):
        batch = torch.randint(0, len(ids), (32,), generator=torch.Generator().manual_seed(step))
        loss = model(ids[batch], labels=labels[batch], head=name).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    train_data = {t: make_data(m, 2000, generator) for t, m in TASKS.items()}
    test_data = {t: make_data(m, 500, generator) for t, m in TASKS.items()}
    model = build_model()
    for task in TASKS:
        train(model, task, train_data[task])

    def scores(adapter: str) -> str:
        model.set_active_adapters(adapter)
        return "  ".join(f"{t}: {accuracy(model, test_data[t], head=t):.3f}" for t in TASKS)

    print("Single-task adapters (accuracy with each task's own head)")
    for task in TASKS:
        print(f"  {task:<28} {scores(task)}")

    print("\nAddition: both adapters merged with weights [1, 1] (normalize_weights=False)")
    for strategy in ("linear", "lora_linear_only_negate_b", "lora_delta_w_concat", "lora_delta_w_svd", "ties"):
        options = {"svd_rank": 4} if strategy == "lora_delta_w_svd" else {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            report = model.average_adapter(f"sum_{strategy}", ["task_a", "task_b"], weights=[1, 1],
                                           combine_strategy=strategy, normalize_weights=False, **options)
        print(f"  {strategy:<28} {scores(f'sum_{strategy}')}   max ΔW error {report.max_error:.3f}")
        show(caught)

    print("\nUnlearning task_b: weights [1, -1] (normalize_weights=False)")
    for strategy in ("linear", "lora_delta_w_concat"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)  # linear warns with its measured error, as it should
            report = model.average_adapter(f"unlearn_{strategy}", {"task_a": 1.0, "task_b": -1.0},
                                           combine_strategy=strategy, normalize_weights=False)
        print(f"  {strategy:<28} {scores(f'unlearn_{strategy}')}   max ΔW error {report.max_error:.3f}")
        print(f"    report: {report.summary()}")
        show(caught)
    from_files(model, scores)


def from_files(model, scores) -> None:
    """The same unlearning merge from saved adapter folders, with no model involved in the merge."""
    with tempfile.TemporaryDirectory() as folder:
        for task in TASKS:
            model.save_adapter(os.path.join(folder, task), task, with_head=False)
        out = os.path.join(folder, "unlearned_from_files")
        report = adapter_merging.merge_saved_adapters(
            {os.path.join(folder, "task_a"): 1.0, os.path.join(folder, "task_b"): -1.0}, out,
            combine_strategy="lora_delta_w_concat", normalize_weights=False,
        )
        name = model.load_adapter(out)
        files = sorted(os.listdir(out))
    print("\nThe same unlearning merge from saved folders (merge_saved_adapters; no model in the merge)")
    print(f"  {name:<28} {scores(name)}   max ΔW error {report.max_error:.3f}   wrote {', '.join(files)}")


def show(caught) -> None:
    """Print the warnings a merge gave, indented under its line."""
    for warning in caught:
        print(textwrap.fill(f"warning: {warning.message}", width=110, initial_indent="    ", subsequent_indent="      "))


if __name__ == "__main__":
    main()
