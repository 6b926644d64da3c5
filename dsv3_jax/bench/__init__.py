"""Benchmarks (`dsv3-bench NAME`): `gemm`, `grouped_gemm`, `train`; one JSON line per measurement.
Figures measured on this project's GPUs, with the commands that produced them: RESULTS.md beside this file."""
