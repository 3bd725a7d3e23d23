"""Benchmarks of anomalib-gcaflow: ``python -m benchmarks.speed`` and ``python -m benchmarks.accuracy``."""
