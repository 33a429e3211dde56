"""Triton kernels only: @triton.jit functions and their launch wrappers."""
