// Other tile shapes of the GEMM (bf16, no activation), built only so the benchmark can time them
// against the default tile in gemm.cu.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include "gemm_kernel.cuh"
#include "kernels.h"

using namespace cudacnn_gemm;

int launch_gemm_variant(int variant, const void* a, const void* b, const void* bias, void* c, int M, int N, int K,
                        int64_t lda, int64_t ldb, int64_t ldc, cudaStream_t stream) {
  using T = __nv_bfloat16;
  switch (variant) {
    case 1: return launch<Tile<128, 256, 64, 2, 4, 3>, T, kNone>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    case 2: return launch<Tile<128, 128, 32, 2, 2, 4>, T, kNone>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    case 3: return launch<Tile<256, 128, 32, 4, 2, 4>, T, kNone>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    case 4: return launch<Tile<128, 128, 64, 2, 2, 3>, T, kNone>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}
