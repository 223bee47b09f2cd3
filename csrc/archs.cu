// What the extension was compiled for. nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,860,890,900) in the
// host pass as well, so this reflects the -gencode flags actually used, whatever set them
// (TORCH_CUDA_ARCH_LIST in setup.py or a manual build). Arch-specific targets (sm_90a) are listed
// under their base capability (9.0): the macro does not tell them apart.
#include <string>
#include <vector>

namespace guidance_kernels {

std::vector<std::string> compiled_archs() {
  std::vector<std::string> archs;
#if defined(__CUDA_ARCH_LIST__)
  for (const int arch : {__CUDA_ARCH_LIST__}) {
    archs.push_back(std::to_string(arch / 100) + "." + std::to_string((arch / 10) % 10));
  }
#endif
  return archs;
}

}  // namespace guidance_kernels
