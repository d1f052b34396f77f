// Other tile shapes of the library's mma.sync GEMM template (src/cudacnn/kernels/cuda/gemm_kernel.cuh), bf16,
// no activation. On an H200 none beat the library's default tile enough to matter (all 0.39-0.50x cuBLAS at
// 4096^3, benchmarks/kernels.md); Hopper runs the wgmma kernel instead. Built and timed by
// dev/cuda_gemm_variants.py.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include "gemm_kernel.cuh"
#include "kernels.h"

using namespace cudacnn_gemm;

int launch_gemm_variant(int variant, const void* a, const void* b, void* c, int M, int N, int K, int64_t lda,
                        int64_t ldb, int64_t ldc, cudaStream_t stream) {
  using T = __nv_bfloat16;
  const void* bias = nullptr;
  switch (variant) {
    case 1: return launch<Tile<128, 256, 64, 2, 4, 3>, T, kNone>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    case 2: return launch<Tile<128, 128, 32, 2, 2, 4>, T, kNone>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    case 3: return launch<Tile<256, 128, 32, 4, 2, 4>, T, kNone>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    case 4: return launch<Tile<128, 128, 64, 2, 2, 3>, T, kNone>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}

const char* variant_error_string(int error) { return cudaGetErrorString((cudaError_t)error); }
