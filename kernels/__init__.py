"""tlcore's Triton kernels with their plain launchers (installed as `tlcore.kernels`).

Importing a module here imports Triton; the ops in `tlcore.ops` do that lazily, so a
machine without Triton can still use the PyTorch and C++ paths.
"""
