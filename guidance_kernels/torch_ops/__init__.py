"""The ``torch`` backend: PyTorch implementations with fp32 arithmetic that run on any device.

Unlike :mod:`guidance_kernels.reference` (which mirrors the anchors, in the input dtype), these
are the production fallback: fp32 accumulation, and the same algorithmic short-cuts as the
kernels (separable blur, σ = ∞ mean query, identity items without attention, chunked key mass).
"""
