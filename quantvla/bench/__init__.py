"""Benchmarks that measure ratios side by side in one run (these machines are noisy)."""
