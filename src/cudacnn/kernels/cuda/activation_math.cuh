// Activation functions and their derivatives in float32, shared by the GEMM epilogue and the
// elementwise kernels. KIND follows KernelActivation in kernels.h.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

template <int KIND>
__device__ __forceinline__ float act_forward(float x) {
  if constexpr (KIND == 1) return fmaxf(x, 0.0f);
  if constexpr (KIND == 2) return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
  if constexpr (KIND == 3) return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
  if constexpr (KIND == 4) return x / (1.0f + __expf(-x));
  return x;
}

template <int KIND>
__device__ __forceinline__ float act_grad(float x) {
  if constexpr (KIND == 1) return x > 0.0f ? 1.0f : 0.0f;
  if constexpr (KIND == 2)
    return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) + x * __expf(-0.5f * x * x) * 0.39894228040143268f;
  if constexpr (KIND == 3) {
    float t = tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * 0.79788456080286536f * (1.0f + 0.134145f * x * x);
  }
  if constexpr (KIND == 4) {
    float s = 1.0f / (1.0f + __expf(-x));
    return s * (1.0f + x * (1.0f - s));
  }
  return 1.0f;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
