"""What every benchmark shares: seeded LoRA factors, peak-memory sampling, the machine's description,
ratio formatting, medians of interleaved runs and running one side in its own process."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


def random_factors(adapter: int, key: str, r: int, d_out: int, d_in: int):
    """Seeded (B, A) of one adapter at one module, the same in every library: A ~ N(0, 1/d_in),
    B ~ N(0, 0.02²), both non-zero (as if trained)."""
    import torch

    generator = torch.Generator().manual_seed(zlib.crc32(f"{adapter}:{key}".encode()))
    a = torch.randn(r, d_in, generator=generator) / math.sqrt(d_in)
    b = 0.02 * torch.randn(d_out, r, generator=generator)
    return b, a


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 2 ms; ``extra_mb`` is
    the peak above the resident memory at the block's start."""

    def __init__(self) -> None:
        self.peak = self.start = self._rss()
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self) -> "PeakRSS":
        self._stop.clear()
        self.start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor()


def machine_info() -> Dict[str, Any]:
    """The machine and library versions a result was measured with."""
    import adapters
    import torch
    import transformers

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "adapters": adapters.__version__,
        "transformers": transformers.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        info["peft"] = None
    return info


def format_ratio(ratio: float) -> str:
    """A time ratio with two significant digits below 10 and whole numbers above, and a ×:
    0.42 → '0.42×', 3.14 → '3.1×', 31.4 → '31×', 318.2 → '318×' (never '0×' for a ratio below 1)."""
    if not math.isfinite(ratio):
        return "n/a" if math.isnan(ratio) else "inf×"
    if ratio <= 0:
        return f"{ratio:g}×"
    decimals = max(0, 1 - math.floor(math.log10(ratio)))
    text = f"{ratio:.{decimals}f}"
    if decimals and float(text) >= 10:  # 9.96 rounds up to 10.0: one digit fewer
        text = f"{ratio:.{decimals - 1}f}"
    return text + "×"


def interleaved(functions: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, List[float]]:
    """Wall seconds of each function, ``repeats`` rounds, the functions taking turns within a round (so
    that drifting load hits them alike)."""
    times: Dict[str, List[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def in_subprocess(module: str, function: str, kwargs: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """``benchmarks.<module>.<function>(**kwargs)`` in a fresh Python process (so that its time and
    peak memory are its own), with the same torch threads as this one; what it writes to stderr
    (progress) is passed through. Returns its JSON-able result with ``status: "ok"``, or
    ``{"status": "timeout" | "failed", ...}``."""
    import torch

    code = (
        "import json, sys, torch; torch.set_num_threads(int(sys.argv[3])); import importlib; "
        "result = getattr(importlib.import_module(sys.argv[1]), sys.argv[2])(**json.loads(sys.argv[4])); "
        "print('RESULT ' + json.dumps(result))"
    )
    command = [sys.executable, "-c", code, f"benchmarks.{module}", function, str(torch.get_num_threads()), json.dumps(kwargs)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    tail: List[str] = []
    output: List[str] = []

    def relay() -> None:  # the only reader of stderr (``communicate`` would race it for the lines)
        for line in process.stderr:
            sys.stderr.write(line)
            tail.append(line)
            del tail[:-40]

    readers = [threading.Thread(target=relay, daemon=True),
               threading.Thread(target=lambda: output.append(process.stdout.read()), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return {"status": "timeout", "timeout_s": timeout}
    finally:
        for reader in readers:
            reader.join(timeout=5)
    stdout = "".join(output)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        return {"status": "failed", "returncode": process.returncode, "stderr_tail": "".join(tail)[-3000:]}
    result = json.loads(lines[-1][len("RESULT "):])
    result["status"] = "ok"
    result["process_wall_s"] = round(time.perf_counter() - start, 2)
    return result


def log_to_stderr(message: str) -> None:
    """Progress of a benchmark: one line on stderr, flushed."""
    print(message, file=sys.stderr, flush=True)
