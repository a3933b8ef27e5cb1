"""Benchmarks: `ldot bench NAME [flags]`; results go to BENCHMARKS.md."""
