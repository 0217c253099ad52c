"""Triton kernels, installed as ``prefopt_fast.kernels``."""
