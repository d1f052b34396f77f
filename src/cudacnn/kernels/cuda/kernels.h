// Launchers of the CUDA C++ kernels. Plain C types only, so that bindings.cpp builds without CUDA headers.
// Each returns a cudaError_t as int (0 = success); cuda_error_string() names it.
#pragma once
#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

enum KernelDType { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum KernelActivation { kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4 };

// C (M, N) = act(A (M, K) @ B (N, K)^T + bias (N)); A, B, C row-major with leading dimensions lda, ldb,
// ldc (elements). bf16 or fp16 only; K, lda, ldb multiples of 8 and A, B 16-byte aligned.
// variant kGemmMmaSync: the mma.sync kernel (gemm.cu, sm_80+); kGemmWgmma: the sm_90a warpgroup-MMA kernel
// (gemm_wgmma.cu). Their numbers are the v0 and v5 of benchmarks/kernels.md (v1-v4: dev/cuda/gemm_variants.cu).
enum GemmVariant { kGemmMmaSync = 0, kGemmWgmma = 5 };
int launch_gemm_tn(int dtype, const void* a, const void* b, const void* bias, void* c, int M, int N, int K,
                   int64_t lda, int64_t ldb, int64_t ldc, int activation, cudaStream_t stream, int variant);

int launch_gemm_wgmma(int dtype, const void* a, const void* b, const void* bias, void* c, int M, int N, int K,
                      int64_t lda, int64_t ldb, int64_t ldc, int activation, cudaStream_t stream);

// y = act(x) and dx = g * act'(x) over n contiguous elements.
int launch_activation_forward(int dtype, const void* x, void* y, int64_t n, int activation, cudaStream_t stream);
int launch_activation_backward(int dtype, const void* g, const void* x, void* dx, int64_t n, int activation,
                               cudaStream_t stream);

const char* cuda_error_string(int error);
