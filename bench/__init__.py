"""Benchmarks: each script prints one JSON object per configuration it measures."""
