"""Numerics independent of modules: FP8 quantization and linears (`fp8`), the MoE grouped GEMM dispatch
(`grouped_matmul`), memory-efficient causal attention (`attention`)."""
