// Activation functions and their derivatives in float32, shared by the GEMM epilogue and the
// elementwise kernels. KIND follows KernelActivation in kernels.h.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Abramowitz & Stegun 7.1.26, |error| < 1.5e-7: a third of erff's instructions. Used where the result is
// rounded to bf16/fp16 (FAST), where erff's cost made the exact GELU compute-bound.
__device__ __forceinline__ float erf_fast(float x) {
  float a = fabsf(x);
  float t = __fdividef(1.0f, 1.0f + 0.3275911f * a);
  float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  return copysignf(1.0f - poly * __expf(-a * a), x);
}

template <bool FAST>
__device__ __forceinline__ float erf_(float x) {
  if constexpr (FAST) return erf_fast(x);
  else return erff(x);
}

// tanh through exp: tanhf under --use_fast_math is tanh.approx, too coarse (2e-5 relative) for float32.
__device__ __forceinline__ float tanh_(float u) { return 1.0f - __fdividef(2.0f, 1.0f + __expf(2.0f * u)); }

template <int KIND, bool FAST = false>
__device__ __forceinline__ float act_forward(float x) {
  if constexpr (KIND == 1) return fmaxf(x, 0.0f);
  if constexpr (KIND == 2) return 0.5f * x * (1.0f + erf_<FAST>(x * 0.70710678118654752f));
  if constexpr (KIND == 3) return 0.5f * x * (1.0f + tanh_(0.79788456080286536f * (x + 0.044715f * x * x * x)));
  if constexpr (KIND == 4) return x / (1.0f + __expf(-x));
  return x;
}

template <int KIND, bool FAST = false>
__device__ __forceinline__ float act_grad(float x) {
  if constexpr (KIND == 1) return x > 0.0f ? 1.0f : 0.0f;
  if constexpr (KIND == 2)
    return 0.5f * (1.0f + erf_<FAST>(x * 0.70710678118654752f)) + x * __expf(-0.5f * x * x) * 0.39894228040143268f;
  if constexpr (KIND == 3) {
    float t = tanh_(0.79788456080286536f * (x + 0.044715f * x * x * x));
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
