// Python bindings of the fdg_combine launcher (csrc/fdg_combine.cu). Kept apart from the .cu so that
// nvcc never parses the Python / pybind11 headers (they only need the host compiler).
#include <torch/csrc/utils/pybind.h>

#include "fdg_combine.h"

namespace guidance_kernels {

void register_fdg_combine(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("fdg_combine", &fdg_combine_cuda,
        "frequency-decoupled guidance on kornia's Laplacian pyramid (down, stats, coefficients, recon, final)",
        py::arg("out"), py::arg("cond"), py::arg("uncond"), py::arg("sizes"), py::arg("tables"), py::arg("scales"),
        py::arg("scale_tensors"), py::arg("weights"), py::arg("phis"), py::arg("phi_tensors"), py::arg("project"),
        py::arg("rescale"), py::arg("original"), py::arg("parts"), py::arg("chunks"), py::arg("data_phi"),
        py::arg("data_phi_tensor"), py::arg("final_parts"), py::arg("final_chunk"));
  m.attr("FDG_COMBINE_TILE") = fdg_combine_tile();
}

}  // namespace guidance_kernels
