"""Soak test with injected faults (python -m bench.soak; README.md, Benchmark)."""
