"""fastdiff's Triton kernels, one file per op family (installed as ``fastdiff.kernels``).

Each file holds private ``@triton.jit`` kernels and a host function per op that validates nothing, allocates
the outputs, picks block sizes and launches. Validation and dispatch live in ``fastdiff.ops``. Importing a
module here imports Triton; ``fastdiff.dispatch`` only does so once it chose the Triton path.
"""
