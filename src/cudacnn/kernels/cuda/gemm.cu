// Tensor-core GEMM with a fused epilogue: C = act(A @ B^T + bias), bf16 or fp16 in, fp32 accumulation.
//
// A (M, K) and B (N, K) are both K-contiguous ("TN", the layout of x and an nn.Linear weight), so every
// operand tile is loaded with ldmatrix without transposes. One block computes a 128x256 tile of C with
// 8 warps (2 x 4, each 64x64 = 4 x 8 mma.sync.m16n8k16). K advances 32 at a time through a 4-stage
// cp.async pipeline in shared memory. Shared tiles are [rows][BK] with the 16-byte chunk index XOR-ed
// by row bits, so ldmatrix reads and cp.async writes are free of bank conflicts. Blocks walk C in groups
// of 8 row-tiles so the A and B tiles they share stay in L2. This is the sm_80+ fallback; on Hopper
// launch_gemm_tn runs gemm_wgmma.cu. (Other tile shapes of this template live in dev/cuda/gemm_variants.cu.)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include "gemm_kernel.cuh"
#include "kernels.h"

namespace {
using namespace cudacnn_gemm;

template <typename T>
int launch_act(int act, const void* a, const void* b, const void* bias, void* c, int M, int N, int K, int64_t lda,
               int64_t ldb, int64_t ldc, cudaStream_t stream) {
  using Cfg = DefaultTile;
  switch (act) {
    case kNone: return launch<Cfg, T, kNone>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    case kRelu: return launch<Cfg, T, kRelu>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    case kGelu: return launch<Cfg, T, kGelu>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    case kGeluTanh: return launch<Cfg, T, kGeluTanh>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    case kSilu: return launch<Cfg, T, kSilu>(a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

int launch_gemm_tn(int dtype, const void* a, const void* b, const void* bias, void* c, int M, int N, int K,
                   int64_t lda, int64_t ldb, int64_t ldc, int activation, cudaStream_t stream, int variant) {
  if (K % 8 || lda % 8 || ldb % 8 || !aligned16(a) || !aligned16(b)) return (int)cudaErrorInvalidValue;
  if (M == 0 || N == 0) return 0;
  if (variant == kGemmWgmma) return launch_gemm_wgmma(dtype, a, b, bias, c, M, N, K, lda, ldb, ldc, activation, stream);
  if (variant != kGemmMmaSync) return (int)cudaErrorInvalidValue;
  if (dtype == kBFloat16) return launch_act<__nv_bfloat16>(activation, a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
  if (dtype == kFloat16) return launch_act<__half>(activation, a, b, bias, c, M, N, K, lda, ldb, ldc, stream);
  return (int)cudaErrorInvalidValue;
}
