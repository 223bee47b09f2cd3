"""The ``triton`` backend: Triton kernels and their launchers, one module per op family.

Importing :mod:`guidance_kernels` never imports this package; the op bodies import a module
here only when the triton backend was chosen. ``TRITON_INTERPRET=1`` must be set before triton
is first imported for the interpreter lane (CPU tensors).
"""
