"""Triton kernels, one module per family. Imported lazily: importing triton costs time and needs a GPU or
TRITON_INTERPRET=1 (set before the first call) to run."""
