"""Benchmarks of rmsprop_jax: train-step timings against optax and PyTorch, and two studies.

Run ``python -m benchmarks`` from the repository root (``--help`` lists the flags). This
folder is not part of the installed package (the wheel holds only ``rmsprop_jax``) and not part
of the test suite; it uses rmsprop_jax only through its public API.
"""
