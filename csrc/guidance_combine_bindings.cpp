// Python bindings of the combine family's launchers (csrc/guidance_combine.cu). Kept apart from the
// .cu so that nvcc never parses the Python / pybind11 headers (they only need the host compiler).
#include <torch/csrc/utils/pybind.h>

#include "guidance_combine.h"

namespace guidance_kernels {

void register_guidance_combine(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("guidance_combine", &guidance_combine_cuda,
        "out = D[base] + sum_t g_t (D[pos_t] - D[neg_t]) (+ rescale); one launch, two with rescale",
        py::arg("out"), py::arg("xs"), py::arg("base"), py::arg("pos"), py::arg("neg"), py::arg("scales"),
        py::arg("scale_tensors"), py::arg("rescale"), py::arg("ref"), py::arg("phi"), py::arg("phi_tensor"),
        py::arg("geometry"), py::arg("parts"), py::arg("chunk"));
  m.def("projected_combine", &projected_combine_cuda,
        "APG (kind 1), CFG-Zero* (2), TCFG (3) or MAG (4) with optional rescale; two launches", py::arg("out"),
        py::arg("cond"), py::arg("uncond"), py::arg("momentum_buffer"), py::arg("kind"), py::arg("formulation"),
        py::arg("scale"), py::arg("scale_tensor"), py::arg("eta"), py::arg("norm_threshold"), py::arg("momentum"),
        py::arg("alpha"), py::arg("rescale"),
        py::arg("phi"), py::arg("phi_tensor"), py::arg("geometry"), py::arg("parts"), py::arg("chunk"));
  m.def("channel_combine", &channel_combine_cuda,
        "the combine followed by CFG-Norm (kind 1) or Mahiro (kind 2), channel-wise; one or two launches",
        py::arg("out"), py::arg("xs"), py::arg("base"), py::arg("pos"), py::arg("neg"), py::arg("scales"),
        py::arg("scale_tensors"), py::arg("kind"), py::arg("ref"), py::arg("strength"), py::arg("strength_tensor"),
        py::arg("geometry"), py::arg("parts"), py::arg("chunk"));
  m.attr("GUIDANCE_COMBINE_TILE") = guidance_combine_tile();
  m.attr("GUIDANCE_COMBINE_THREADS") = guidance_combine_threads();
}

}  // namespace guidance_kernels
