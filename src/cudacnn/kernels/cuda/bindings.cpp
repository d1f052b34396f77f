// PyTorch bindings of the CUDA C++ kernels. Shapes and dtypes are checked in Python (cuda_ext.py);
// here: pointers, the caller's stream, and every launch's error code.
#include <torch/extension.h>
#include "kernels.h"

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default: TORCH_CHECK(false, "cudacnn CUDA kernels take float32, bfloat16 or float16, not ", t.scalar_type());
  }
  return -1;
}

void check(int error, const char* what) { TORCH_CHECK(error == 0, what, " failed: ", cuda_error_string(error)); }

void gemm_tn(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias, at::Tensor& c,
             int64_t activation, int64_t stream, int64_t variant) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && a.stride(1) == 1 && b.stride(1) == 1 &&
                  c.stride(1) == 1, "gemm_tn needs row-major 2-D a, b, c");
  const void* bias_ptr = bias.has_value() ? bias->data_ptr() : nullptr;
  check(launch_gemm_tn(dtype_code(a), a.data_ptr(), b.data_ptr(), bias_ptr, c.data_ptr(), (int)a.size(0),
                       (int)b.size(0), (int)a.size(1), a.stride(0), b.stride(0), c.stride(0), (int)activation,
                       reinterpret_cast<cudaStream_t>(stream), (int)variant),
        "gemm_tn");
}

void activation_forward(const at::Tensor& x, at::Tensor& y, int64_t activation, int64_t stream) {
  check(launch_activation_forward(dtype_code(x), x.data_ptr(), y.data_ptr(), x.numel(), (int)activation,
                                  reinterpret_cast<cudaStream_t>(stream)),
        "activation_forward");
}

void activation_backward(const at::Tensor& g, const at::Tensor& x, at::Tensor& dx, int64_t activation,
                         int64_t stream) {
  check(launch_activation_backward(dtype_code(x), g.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(),
                                   (int)activation, reinterpret_cast<cudaStream_t>(stream)),
        "activation_backward");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm_tn", &gemm_tn, "C = act(A @ B^T + bias), bf16/fp16 tensor cores");
  m.def("activation_forward", &activation_forward, "y = act(x)");
  m.def("activation_backward", &activation_backward, "dx = g * act'(x)");
}
