"""Soak test with injected faults (python -m bench.soak; docs/benchmarks.md, Soak with faults)."""
