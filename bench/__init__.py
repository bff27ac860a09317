"""Benchmarks against the PyTorch reference; run from the repository's root as `python -m bench.run`
(see bench/README.md). Figures live in reports, never in tests."""
