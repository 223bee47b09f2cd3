// The extension module guidance_kernels._C: one registration function per op family (each family's
// launchers live in csrc/<family>.cu, its bindings in csrc/<family>_bindings.cpp). Adding a family
// is one declaration and one call below.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

namespace guidance_kernels {
std::vector<std::string> compiled_archs();  // csrc/archs.cu
void register_fdg_combine(pybind11::module_& m);
void register_guidance_combine(pybind11::module_& m);
void register_sag_degrade(pybind11::module_& m);
}  // namespace guidance_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "guidance_kernels CUDA kernels (hand-written CUDA C++); use the guidance_kernels package API";
  m.def("compiled_archs", &guidance_kernels::compiled_archs,
        "Compute capabilities this build carries code for, e.g. ['8.0', '9.0'] (9.0 also for sm_90a)");
  guidance_kernels::register_fdg_combine(m);
  guidance_kernels::register_guidance_combine(m);
  guidance_kernels::register_sag_degrade(m);
}
