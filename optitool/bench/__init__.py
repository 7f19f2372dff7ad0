"""Benchmarks: runtimes, timing, statistics and memory, kept apart from the passes they measure."""
