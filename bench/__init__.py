"""Benchmarks: timing and scale targets, measured on simulated farms over loopback."""
