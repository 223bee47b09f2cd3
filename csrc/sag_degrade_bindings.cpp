// Python bindings of the SAG degrade launcher (csrc/sag_degrade.cu). Kept apart from the .cu so that
// nvcc never parses the Python / pybind11 headers (they only need the host compiler).
#include <torch/csrc/utils/pybind.h>

#include "sag_degrade.h"

namespace guidance_kernels {

void register_sag_degrade(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("sag_degrade", &sag_degrade_cuda,
        "SAG degrade: threshold + nearest map + Gaussian blur + blend + re-noise in one launch", py::arg("out"),
        py::arg("degraded"), py::arg("x0"), py::arg("mask_map"), py::arg("thresholded"), py::arg("threshold"),
        py::arg("weights"), py::arg("renoise"), py::arg("other"), py::arg("alpha"), py::arg("alpha_value"));
}

}  // namespace guidance_kernels
