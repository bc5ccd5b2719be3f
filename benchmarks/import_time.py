"""Start-up time: how long a fresh interpreter takes to import the package, answer ``adapter-merge
--help`` / ``--version``, and reach the merge function, against the eager imports the package did
before its names became lazy, ``import torch`` and an empty interpreter.

Each case is a fresh ``python`` process, the cases taking turns within a round (`common.interleaved`)
so that drifting load hits them alike; the table gives the median and the range of the rounds, and
which of torch, ``adapters`` and ``transformers`` each case loaded (checked in one more run per case).
``--help`` has a target: at most 0.5 s.

    python -m benchmarks.run --only import
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, List

from benchmarks.common import ROOT, interleaved, log_to_stderr, median

HEAVY = ("torch", "adapters", "transformers")
TARGET_HELP_S = 0.5
#: case → the Python code a fresh interpreter runs
CASES: Dict[str, str] = {
    "python (empty interpreter)": "pass",
    "import torch": "import torch",
    "import adapter_merging": "import adapter_merging",
    "adapter-merge --help": "import sys; sys.argv = ['adapter-merge', '--help']; import adapter_merging.cli as c\n"
                            "try:\n    c.main()\nexcept SystemExit:\n    pass",
    "adapter-merge --version": "import sys; sys.argv = ['adapter-merge', '--version']; import adapter_merging.cli as c\n"
                               "try:\n    c.main()\nexcept SystemExit:\n    pass",
    "from adapter_merging import merge_saved_adapters": "from adapter_merging import merge_saved_adapters",
    # what `import adapter_merging` (and so `--help`) imported before the names were lazy
    "eager imports (the package before lazy names)":
        "import adapter_merging.model_mixin, adapter_merging.report, adapter_merging.strategies, adapter_merging.files",
}


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=True)


def loaded(code: str) -> List[str]:
    """Which of torch, adapters and transformers running ``code`` leaves in ``sys.modules``."""
    check = f"{code}\nimport sys, json\nprint('LOADED ' + json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    lines = [line for line in _python(check).stdout.splitlines() if line.startswith("LOADED ")]
    return json.loads(lines[-1][len("LOADED "):])


def run(quick: bool = False) -> Dict[str, Any]:
    repeats = 1 if quick else 5
    log_to_stderr(f"import: {len(CASES)} cases × {repeats} fresh interpreters")
    times = interleaved({name: (lambda code=code: _python(code)) for name, code in CASES.items()}, repeats)
    rows = []
    for name, code in CASES.items():
        rows.append({"case": name, "code": code, "median_s": round(median(times[name]), 4),
                     "min_s": round(min(times[name]), 4), "max_s": round(max(times[name]), 4),
                     "runs": len(times[name]), "loaded": loaded(code)})
    help_row = next(row for row in rows if row["case"] == "adapter-merge --help")
    return {"setup": {"repeats": repeats, "target_help_s": TARGET_HELP_S},
            "rows": rows, "help_target_met": help_row["median_s"] <= TARGET_HELP_S}


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=1))
