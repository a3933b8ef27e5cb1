"""Benchmarks: `python -m ldot_jax.bench NAME [flags]`; results go to BENCHMARKS.md."""
