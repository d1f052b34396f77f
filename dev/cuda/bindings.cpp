// PyTorch binding of dev/cuda/gemm_variants.cu: C (M, N) = A (M, K) @ B (N, K)^T, bf16, row-major.
#include <torch/extension.h>
#include <cstdint>
#include "kernels.h"

int launch_gemm_variant(int variant, const void* a, const void* b, void* c, int M, int N, int K, int64_t lda,
                        int64_t ldb, int64_t ldc, cudaStream_t stream);
const char* variant_error_string(int error);

void gemm_variant(const at::Tensor& a, const at::Tensor& b, at::Tensor& c, int64_t variant, int64_t stream) {
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 && c.scalar_type() == at::kBFloat16,
              "gemm_variant takes bfloat16 only");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && a.stride(1) == 1 && b.stride(1) == 1 && c.stride(1) == 1,
              "gemm_variant needs row-major 2-D a, b, c");
  TORCH_CHECK(a.size(1) % 8 == 0 && a.stride(0) % 8 == 0 && b.stride(0) % 8 == 0,
              "K and the row strides must be multiples of 8");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 == 0,
              "a and b must be 16-byte aligned");
  TORCH_CHECK(a.size(1) == b.size(1) && c.size(0) == a.size(0) && c.size(1) == b.size(0), "shapes do not match");
  int error = launch_gemm_variant((int)variant, a.data_ptr(), b.data_ptr(), c.data_ptr(), (int)a.size(0),
                                  (int)b.size(0), (int)a.size(1), a.stride(0), b.stride(0), c.stride(0),
                                  reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(error == 0, "gemm_variant ", variant, " failed: ", variant_error_string(error));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemm_variant", &gemm_variant, "C = A @ B^T, bf16, one tile shape"); }
