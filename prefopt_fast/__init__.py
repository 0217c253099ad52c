"""prefopt_fast: fused kernels for the losses of LLM preference training."""
__version__ = "0.1.0"
