"""Benchmarks: what peftsweep costs and saves, measured side by side (`make bench`, docs/BENCHMARKS.md)."""
