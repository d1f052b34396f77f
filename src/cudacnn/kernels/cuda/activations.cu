// Elementwise activations, forward and backward. Each thread moves 16 bytes per access (LDG.128/STG.128)
// in a grid-stride loop; a misaligned tensor takes the one-element path.
#include <cuda_runtime.h>
#include <cstdint>
#include <type_traits>
#include "activation_math.cuh"
#include "kernels.h"

namespace {

// 16-bit outputs take the cheaper erf (see activation_math.cuh): its error is far below their rounding.
template <typename T>
constexpr bool kFast = !std::is_same<T, float>::value;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC, int KIND>
__global__ void activation_forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  int64_t n_vec = n / VEC;
  int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_vec; i += stride) {
    Vec<T, VEC> in = reinterpret_cast<const Vec<T, VEC>*>(x)[i], out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = from_float<T>(act_forward<KIND, kFast<T>>(to_float(in.v[j])));
    reinterpret_cast<Vec<T, VEC>*>(y)[i] = out;
  }
  int64_t tail = n_vec * VEC + (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (tail < n) y[tail] = from_float<T>(act_forward<KIND, kFast<T>>(to_float(x[tail])));
}

template <typename T, int VEC, int KIND>
__global__ void activation_backward_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ dx,
                                           int64_t n) {
  int64_t n_vec = n / VEC;
  int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_vec; i += stride) {
    Vec<T, VEC> gv = reinterpret_cast<const Vec<T, VEC>*>(g)[i];
    Vec<T, VEC> xv = reinterpret_cast<const Vec<T, VEC>*>(x)[i], out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = from_float<T>(to_float(gv.v[j]) * act_grad<KIND, kFast<T>>(to_float(xv.v[j])));
    reinterpret_cast<Vec<T, VEC>*>(dx)[i] = out;
  }
  int64_t tail = n_vec * VEC + (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (tail < n) dx[tail] = from_float<T>(to_float(g[tail]) * act_grad<KIND, kFast<T>>(to_float(x[tail])));
}

constexpr int kThreads = 256;

int grid_for(int64_t n_vec) {
  // Enough blocks to fill every SM several times over; the grid-stride loop covers the rest.
  int64_t blocks = (n_vec + kThreads - 1) / kThreads;
  if (blocks > 132 * 32) blocks = 132 * 32;
  return blocks < 1 ? 1 : (int)blocks;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename T, int KIND>
void forward(const void* x, void* y, int64_t n, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  if (aligned16(x) && aligned16(y))
    activation_forward_kernel<T, VEC, KIND><<<grid_for(n / VEC), kThreads, 0, stream>>>((const T*)x, (T*)y, n);
  else
    activation_forward_kernel<T, 1, KIND><<<grid_for(n), kThreads, 0, stream>>>((const T*)x, (T*)y, n);
}

template <typename T, int KIND>
void backward(const void* g, const void* x, void* dx, int64_t n, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  if (aligned16(g) && aligned16(x) && aligned16(dx))
    activation_backward_kernel<T, VEC, KIND>
        <<<grid_for(n / VEC), kThreads, 0, stream>>>((const T*)g, (const T*)x, (T*)dx, n);
  else
    activation_backward_kernel<T, 1, KIND><<<grid_for(n), kThreads, 0, stream>>>((const T*)g, (const T*)x, (T*)dx, n);
}

template <typename T>
int dispatch(bool is_forward, const void* g, const void* x, void* out, int64_t n, int act, cudaStream_t stream) {
  switch (act) {
#define CASE(K)                                              \
  case K:                                                    \
    if (is_forward) forward<T, K>(x, out, n, stream);        \
    else backward<T, K>(g, x, out, n, stream);               \
    break;
    CASE(0) CASE(1) CASE(2) CASE(3) CASE(4)
#undef CASE
    default:
      return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

int dispatch_dtype(int dtype, bool is_forward, const void* g, const void* x, void* out, int64_t n, int act,
                   cudaStream_t stream) {
  if (n == 0) return 0;
  switch (dtype) {
    case kFloat32: return dispatch<float>(is_forward, g, x, out, n, act, stream);
    case kBFloat16: return dispatch<__nv_bfloat16>(is_forward, g, x, out, n, act, stream);
    case kFloat16: return dispatch<__half>(is_forward, g, x, out, n, act, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}

}  // namespace

int launch_activation_forward(int dtype, const void* x, void* y, int64_t n, int activation, cudaStream_t stream) {
  return dispatch_dtype(dtype, true, nullptr, x, y, n, activation, stream);
}

int launch_activation_backward(int dtype, const void* g, const void* x, void* dx, int64_t n, int activation,
                               cudaStream_t stream) {
  return dispatch_dtype(dtype, false, g, x, dx, n, activation, stream);
}

const char* cuda_error_string(int error) { return cudaGetErrorString((cudaError_t)error); }
