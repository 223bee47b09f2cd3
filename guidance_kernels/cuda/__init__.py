"""The ``cuda`` backend: thin Python glue around the compiled extension ``guidance_kernels._C``.

The kernels are hand-written CUDA C++ in ``csrc/include/guidance_kernels/*.cuh`` (no torch
headers); ``csrc/*.cu`` holds the launchers (argument checks, stream, dtype dispatch). This
package plans the launch (layout, partitions) in Python exactly as the triton backend does and
passes plain integers to the launcher.
"""
