"""Fused Triton kernels, one file per op family."""
