"""Strata benchmarks: `bench/run NAME [--quick]` (one module per NAME in this package)."""
