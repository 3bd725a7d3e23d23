"""Benchmarks of anomalib-gcaflow: `python -m benchmarks.<accuracy|speed|convergence|gpu_check>`; see README.md."""
