"""Triton kernels of fastmeta, installed as ``fastmeta.kernels``."""
