// The launcher of tlcore's CUDA int8 convolution (kernels: int8_conv_kernels.cuh).
//
// Kernel choice (int8_conv2d_cuda): mma on compute capability >= 8.0 when the binary holds sm_80+
// code for the device, dp4a otherwise. TLCORE_INT8_CUDA_KERNEL=dp4a|mma forces one (tests,
// benchmarks; auto or unset picks), read on every launch; forcing mma where it cannot run throws.
// Either way a conv whose coordinates do not fit the mma kernel's int32 ones (mma_coordinates_fit:
// padding or dilation near 2**31) runs on dp4a.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "int8_conv.h"
#include "int8_conv_kernels.cuh"

namespace tlcore {
namespace {
// ---- launcher --------------------------------------------------------------------------------

enum class Kernel { kDp4a, kMma };

// Whether the mma kernel can run on `device`: compute capability >= 8.0, and the code the runtime
// loads for it was compiled for sm_80+ (ptxVersion; an older arch's build compiles the body out).
// Queried once per device.
bool mma_available(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 0 unknown, 1 no, 2 yes
  if (device < 0 || device >= kMaxDevices) return false;
  int known = cache[device].load(std::memory_order_relaxed);
  if (known == 0) {
    int major = 0;
    cudaFuncAttributes attributes{};
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                    cudaFuncGetAttributes(&attributes, int8_conv_mma_kernel<false>) == cudaSuccess;
    if (!ok) cudaGetLastError();  // clear the error: the dp4a path runs instead
    known = ok && major >= 8 && attributes.ptxVersion >= 80 ? 2 : 1;
    cache[device].store(known, std::memory_order_relaxed);
  }
  return known == 2;
}

Kernel choose_kernel(int device) {
  const char* forced = std::getenv(kInt8CudaKernelEnv);
  const bool mma = mma_available(device);
  if (forced == nullptr || forced[0] == '\0' || std::strcmp(forced, "auto") == 0) {
    return mma ? Kernel::kMma : Kernel::kDp4a;
  }
  if (std::strcmp(forced, "dp4a") == 0) return Kernel::kDp4a;
  if (std::strcmp(forced, "mma") == 0) {
    if (!mma) {
      throw std::invalid_argument(std::string(kInt8CudaKernelEnv) + "=mma, but the mma kernel cannot run on CUDA "
                                  "device " + std::to_string(device) +
                                  " (it needs compute capability >= 8.0 and a build for sm_80 or newer)");
    }
    return Kernel::kMma;
  }
  throw std::invalid_argument(std::string(kInt8CudaKernelEnv) + "=" + forced + ": choose auto, dp4a or mma");
}

int current_device() {
  int device = 0;
  const cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("tlcore int8 conv (CUDA): cudaGetDevice failed: ") +
                             cudaGetErrorString(error));
  }
  return device;
}

}  // namespace

const char* int8_cuda_kernel_name() { return choose_kernel(current_device()) == Kernel::kMma ? "mma" : "dp4a"; }

void int8_conv2d_cuda(const Int8ConvArgs& args, void* stream) {
  const bool mma = choose_kernel(current_device()) == Kernel::kMma && mma_coordinates_fit(args);
  const Int8ConvLaunch launch = int8_conv_launch(args, mma);
  if (launch.grid.y > 65535) throw std::invalid_argument("tlcore int8 conv (CUDA): too many output channels");
  launch.kernel<<<launch.grid, launch.threads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("tlcore int8 conv (CUDA): launch failed: ") + cudaGetErrorString(error));
  }
}

}  // namespace tlcore
