"""The benchmark suite of adapter_merging (not installed with the package): ``python -m benchmarks.run``."""
