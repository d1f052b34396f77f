// The fused BatchNorm op's eager path in C++: a forward and backward that launch the op's compiled Triton
// kernels from recorded launch plans, with a C++ autograd node (kernels/planned.py records and registers them).
//
// Why: each eager call of the op from Python costs ~115 us of host time a direction (the autograd.Function,
// four buffer allocations, the launcher's argument parsing), more than PyTorch's BatchNorm + ReLU + pool and
// more than the kernels take on the GPU; a CNN's eager epoch is host-bound, so that host time is the epoch's.
// Here a call is one pybind call, a hash lookup, the allocations and the cuLaunchKernel calls.
//
// A plan is what the Python path launches for one key (the call's flags, device, and each tensor's dtype,
// sizes, strides and 16-byte alignment, which is all that the launches' arguments and Triton's specialization
// depend on): the buffers it allocates, and for each launch the CUfunction, grid, block, shared memory and
// every runtime parameter in order, each a tensor slot's data pointer, an integer or float constant, or one
// of the call's two float scalars (momentum, eps). Triton's kernels take two scratch pointers after their
// parameters; plans are only made for kernels that need no scratch, so both are null.
#include <dlfcn.h>
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <unordered_map>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LaunchKernel = int (*)(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                             unsigned bz, unsigned shared, void* stream, void** params, void** extra);
using ErrorString = int (*)(int error, const char** text);
using CtxGetCurrent = int (*)(void** context);
using CtxSetCurrent = int (*)(void* context);
using DeviceGet = int (*)(int* device, int ordinal);
using PrimaryCtxRetain = int (*)(void** context, int device);

// The driver's cuLaunchKernel from the libcuda that PyTorch and Triton have loaded (no link-time dependency).
struct Driver {
  LaunchKernel launch = nullptr;
  ErrorString error_string = nullptr;
  CtxGetCurrent ctx_get_current = nullptr;
  CtxSetCurrent ctx_set_current = nullptr;
  DeviceGet device_get = nullptr;
  PrimaryCtxRetain primary_ctx_retain = nullptr;
  Driver() {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW);
    TORCH_CHECK(lib != nullptr, "cudacnn planned launch: cannot open libcuda.so.1");
    launch = reinterpret_cast<LaunchKernel>(dlsym(lib, "cuLaunchKernel"));
    error_string = reinterpret_cast<ErrorString>(dlsym(lib, "cuGetErrorString"));
    ctx_get_current = reinterpret_cast<CtxGetCurrent>(dlsym(lib, "cuCtxGetCurrent"));
    ctx_set_current = reinterpret_cast<CtxSetCurrent>(dlsym(lib, "cuCtxSetCurrent"));
    device_get = reinterpret_cast<DeviceGet>(dlsym(lib, "cuDeviceGet"));
    primary_ctx_retain = reinterpret_cast<PrimaryCtxRetain>(dlsym(lib, "cuDevicePrimaryCtxRetain"));
    TORCH_CHECK(launch != nullptr && ctx_get_current != nullptr && ctx_set_current != nullptr &&
                    device_get != nullptr && primary_ctx_retain != nullptr,
                "cudacnn planned launch: libcuda.so.1 lacks a driver function it needs");
  }
};

const Driver& driver() {
  static const Driver d;
  return d;
}

void check(int error, const char* what) {
  if (error == 0) return;
  const char* text = "unknown error";
  if (driver().error_string != nullptr) driver().error_string(error, &text);
  TORCH_CHECK(false, "cudacnn planned launch: ", what, " failed: ", text);
}

// A driver launch needs a current context, and a thread may have none: autograd runs a backward on its own
// device thread, where PyTorch's runtime calls would bind the primary context lazily but a node that only
// launches through the driver finds none (CUDA_ERROR_INVALID_CONTEXT). The device's primary context is the
// one PyTorch and Triton use; a thread that has a context keeps it (the caller's CUDAGuard picked the device).
void ensure_context(int device) {
  void* context = nullptr;
  check(driver().ctx_get_current(&context), "cuCtxGetCurrent");
  if (context != nullptr) return;
  int handle = 0;
  check(driver().device_get(&handle, device), "cuDeviceGet");
  check(driver().primary_ctx_retain(&context, handle), "cuDevicePrimaryCtxRetain");
  check(driver().ctx_set_current(context), "cuCtxSetCurrent");
}

enum ArgKind : int64_t { kSlot = 0, kInt32 = 1, kInt64 = 2, kFloat32 = 3, kScalar = 4 };

struct Arg {
  int64_t kind;
  int64_t value;  // slot, integer, or scalar index
  double real;    // kFloat32
};

struct Launch {
  void* function;
  unsigned grid[3];
  unsigned threads;
  unsigned shared;
  std::vector<Arg> args;
};

struct Layout {  // a buffer to allocate, or the layout an input must have
  std::vector<int64_t> sizes, strides;
  c10::ScalarType dtype;
};

struct Plan {
  int64_t inputs = 0;                  // slots [0, inputs): the call's tensors
  std::vector<Layout> buffers;         // then one slot per buffer, allocated each call
  std::vector<at::Tensor> constants;   // then tensors the plan holds (the kernels' zeroed counters)
  std::vector<Launch> launches;
  std::vector<int64_t> outputs;        // slots returned (-1: none)
  std::optional<Layout> first;         // backward: the layout the incoming gradient is copied into if it differs
};

struct PlanPair {
  Plan forward, backward;
};

constexpr int kMaxArgs = 62;

union Value {
  void* pointer;
  int32_t i32;
  int64_t i64;
  float f32;
};

// Allocates the plan's buffers into table (after the inputs, which it holds) and runs its launches on the
// current stream.
void run(const Plan& plan, std::vector<at::Tensor>& table, const double* scalars, const at::Tensor& like) {
  table.reserve(plan.inputs + plan.buffers.size() + plan.constants.size());
  for (const Layout& b : plan.buffers) {
    table.push_back(at::empty_strided(b.sizes, b.strides, like.options().dtype(b.dtype)));
  }
  for (const at::Tensor& c : plan.constants) table.push_back(c);
  ensure_context(like.get_device());
  void* stream = c10::cuda::getCurrentCUDAStream(like.get_device()).stream();
  Value values[kMaxArgs + 2];
  void* params[kMaxArgs + 2];
  for (const Launch& l : plan.launches) {
    if (l.grid[0] == 0 || l.grid[1] == 0 || l.grid[2] == 0) continue;
    const size_t n = l.args.size();
    for (size_t i = 0; i < n; ++i) {
      const Arg& a = l.args[i];
      switch (a.kind) {
        case kSlot: {
          const at::Tensor& t = table[a.value];
          values[i].pointer = t.defined() ? t.data_ptr() : nullptr;
          break;
        }
        case kInt32: values[i].i32 = static_cast<int32_t>(a.value); break;
        case kInt64: values[i].i64 = a.value; break;
        case kFloat32: values[i].f32 = static_cast<float>(a.real); break;
        case kScalar: values[i].f32 = static_cast<float>(scalars[a.value]); break;
        default: TORCH_CHECK(false, "cudacnn planned launch: bad argument kind ", a.kind);
      }
      params[i] = &values[i];
    }
    values[n].pointer = nullptr;  // global and profile scratch: none
    values[n + 1].pointer = nullptr;
    params[n] = &values[n];
    params[n + 1] = &values[n + 1];
    check(driver().launch(l.function, l.grid[0], l.grid[1], l.grid[2], l.threads, 1, 1, l.shared, stream, params,
                          nullptr),
          "cuLaunchKernel");
  }
}

bool aligned(const at::Tensor& t) { return (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0; }

void put(std::vector<int64_t>& key, const at::Tensor& t) {
  if (!t.defined()) {
    key.push_back(-1);
    return;
  }
  key.push_back(static_cast<int64_t>(t.scalar_type()));
  key.push_back(t.dim());
  for (int64_t s : t.sizes()) key.push_back(s);
  for (int64_t s : t.strides()) key.push_back(s);
  key.push_back(aligned(t));
}

std::vector<int64_t> make_key(int64_t config, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                              const at::Tensor& r, const at::Tensor& rm, const at::Tensor& rv) {
  std::vector<int64_t> key;
  key.reserve(64);
  key.push_back(config);
  key.push_back(x.get_device());
  for (const at::Tensor* t : {&x, &w, &b, &r, &rm, &rv}) put(key, *t);
  return key;
}

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& key) const {
    size_t h = key.size();
    for (int64_t v : key) h ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h;
  }
};

std::unordered_map<std::vector<int64_t>, std::unique_ptr<PlanPair>, KeyHash>& plans() {
  static std::unordered_map<std::vector<int64_t>, std::unique_ptr<PlanPair>, KeyHash> table;
  return table;
}

at::Tensor opt(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// The forward plan on x (the fused op's input): the output, with what its backward needs saved in ctx.
at::Tensor forward_plan(AutogradContext* ctx, const PlanPair* pair, const at::Tensor& x, const at::Tensor& w,
                        const at::Tensor& b, const at::Tensor& r, const at::Tensor& rm, const at::Tensor& rv,
                        double momentum, double eps, std::vector<at::Tensor> more = {}) {
  std::vector<at::Tensor> table{x, w, b, r, rm, rv};
  const double scalars[2] = {momentum, eps};
  run(pair->forward, table, scalars, x);
  const auto& out = pair->forward.outputs;  // y, mean, rstd
  std::vector<at::Tensor> saved{x, w, b, r, table[out[1]], table[out[2]]};
  saved.insert(saved.end(), more.begin(), more.end());
  ctx->save_for_backward(saved);
  ctx->saved_data["pair"] = reinterpret_cast<int64_t>(pair);
  return table[out[0]];
}

const Plan& backward_of(AutogradContext* ctx) {
  return reinterpret_cast<const PlanPair*>(ctx->saved_data["pair"].toInt())->backward;
}

// The backward plan: the slot table after it ran (dx, dweight, dbias, dresidual at plan.outputs).
std::vector<at::Tensor> backward_plan(AutogradContext* ctx, const variable_list& saved, at::Tensor g) {
  const Plan& plan = backward_of(ctx);
  const Layout& want = *plan.first;
  if (g.scalar_type() != want.dtype || g.sizes() != c10::IntArrayRef(want.sizes) ||
      g.strides() != c10::IntArrayRef(want.strides) || !aligned(g)) {
    at::Tensor conformed = at::empty_strided(want.sizes, want.strides, g.options().dtype(want.dtype));
    conformed.copy_(g);
    g = conformed;
  }
  std::vector<at::Tensor> table{g, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5]};
  const double scalars[2] = {0.0, 0.0};
  run(plan, table, scalars, saved[0]);
  return table;
}

// The gradients of the op's weight, bias and residual into result[first..first+3) for those that were given
// (saved[1..4)); edge counts the node's tensor inputs so far (needs_input_grad counts only those present).
void norm_gradients(AutogradContext* ctx, const variable_list& saved, const Plan& plan,
                    const std::vector<at::Tensor>& table, variable_list& result, size_t first, size_t& edge) {
  for (size_t i = 1; i < 4; ++i) {
    if (!saved[i].defined()) continue;
    const int64_t slot = plan.outputs[i];
    if (slot >= 0 && ctx->needs_input_grad(edge)) result[first + i - 1] = table[slot];
    ++edge;
  }
}

// y = maxpool?(act(batchnorm(x) + residual)), forward and backward through the plans.
struct BatchNormAct : public torch::autograd::Function<BatchNormAct> {
  // Absent inputs are nullopt, not undefined tensors: autograd takes an undefined tensor for a variable.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var, double momentum, double eps,
                            int64_t pair_address) {
    return forward_plan(ctx, reinterpret_cast<const PlanPair*>(pair_address), x, opt(weight), opt(bias),
                        opt(residual), opt(running_mean), opt(running_var), momentum, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();
    c10::cuda::CUDAGuard guard(saved[0].device());
    const std::vector<at::Tensor> table = backward_plan(ctx, saved, grads[0]);
    const Plan& plan = backward_of(ctx);
    // One gradient a forward argument (none for the non-tensors and absent inputs).
    variable_list result(9);
    if (plan.outputs[0] >= 0 && ctx->needs_input_grad(0)) result[0] = table[plan.outputs[0]];
    size_t edge = 1;
    norm_gradients(ctx, saved, plan, table, result, 1, edge);
    return result;
  }
};

// A convolution's settings, and what it computed before the node that owns its backward was made: the fused
// op's plan is found by its input's layout, so the convolution runs first (in the entry, below autograd).
struct ConvCall {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups = 1;
  at::Tensor x, weight, bias;  // as the convolution took them: cast to the autocast dtype when autocast is on
  at::Tensor y;
  // y feeds a BatchNorm with batch statistics, whose output does not change when a channel of y is shifted, so
  // the convolution's bias gradient (the sum of dy over each channel) is zero and is not computed
  bool bias_grad_is_zero = false;
};

// y = maxpool?(act(batchnorm(conv2d(x, conv_weight, conv_bias)) + residual)) with one autograd node: the
// convolution is PyTorch's (cuDNN, as F.conv2d runs it, autocast's casts included), the rest the fused op's
// plans: one node a layer where the two calls make three (the convolution's, autocast's weight cast's, the
// op's), and no Python between them (benchmarks/kernels.md, "Convolution and the fused op in one node").
struct ConvBatchNormAct : public torch::autograd::Function<ConvBatchNormAct> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& conv_weight,
                            const std::optional<at::Tensor>& conv_bias, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var, double momentum, double eps,
                            int64_t pair_address, int64_t call_address) {
    const auto* call = reinterpret_cast<const ConvCall*>(call_address);
    ctx->saved_data["stride"] = call->stride;
    ctx->saved_data["padding"] = call->padding;
    ctx->saved_data["dilation"] = call->dilation;
    ctx->saved_data["groups"] = call->groups;
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(conv_weight.scalar_type());
    ctx->saved_data["bias_dtype"] = conv_bias.has_value() ? static_cast<int64_t>(conv_bias->scalar_type()) : -1;
    ctx->saved_data["bias_grad_is_zero"] = call->bias_grad_is_zero;
    return forward_plan(ctx, reinterpret_cast<const PlanPair*>(pair_address), call->y, opt(weight), opt(bias),
                        opt(residual), opt(running_mean), opt(running_var), momentum, eps, {call->x, call->weight});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();  // the fused op's six, then the convolution's x and weight
    c10::cuda::CUDAGuard guard(saved[0].device());
    const std::vector<at::Tensor> table = backward_plan(ctx, saved, grads[0]);
    const Plan& plan = backward_of(ctx);
    variable_list result(12);
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const bool has_bias = bias_dtype >= 0;
    const bool bias_grad = has_bias && ctx->needs_input_grad(2);
    const bool bias_grad_is_zero = ctx->saved_data["bias_grad_is_zero"].toBool();
    // without the BatchNorm the op's backward plan gives the sum of dy over each channel (float32, in the
    // launch that writes dy), which is the bias gradient
    const int64_t input_sum = bias_grad_is_zero ? -1 : plan.outputs[2];
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   bias_grad && !bias_grad_is_zero && input_sum < 0};
    const at::Tensor& w = saved[7];
    if (bias_grad && bias_grad_is_zero) {
      result[2] = at::zeros({w.size(0)}, w.options().dtype(static_cast<c10::ScalarType>(bias_dtype)));
    } else if (bias_grad && input_sum >= 0) {
      result[2] = table[input_sum].to(static_cast<c10::ScalarType>(bias_dtype));
    }
    if (mask[0] || mask[1] || mask[2]) {
      const std::vector<int64_t> bias_sizes{w.size(0)};
      auto grad = at::convolution_backward(
          table[plan.outputs[0]], saved[6], w, has_bias ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt,
          ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
          ctx->saved_data["dilation"].toIntVector(), false, std::vector<int64_t>(w.dim() - 2, 0),
          ctx->saved_data["groups"].toInt(), mask);
      // autocast's casts' backward: each gradient in its input's dtype
      const int64_t dtypes[3] = {ctx->saved_data["x_dtype"].toInt(), ctx->saved_data["weight_dtype"].toInt(),
                                 bias_dtype};
      at::Tensor* grads_out[3] = {&std::get<0>(grad), &std::get<1>(grad), &std::get<2>(grad)};
      for (int i = 0; i < 3; ++i) {
        if (mask[i]) result[i] = grads_out[i]->to(static_cast<c10::ScalarType>(dtypes[i]));
      }
    }
    size_t edge = has_bias ? 3 : 2;
    norm_gradients(ctx, saved, plan, table, result, 3, edge);
    return result;
  }
};

Launch to_launch(const py::tuple& t) {
  Launch l;
  l.function = reinterpret_cast<void*>(t[0].cast<uintptr_t>());
  auto grid = t[1].cast<std::vector<int64_t>>();
  TORCH_CHECK(grid.size() == 3, "cudacnn planned launch: a grid has 3 sizes");
  for (int i = 0; i < 3; ++i) l.grid[i] = static_cast<unsigned>(grid[i]);
  l.threads = t[2].cast<unsigned>();
  l.shared = t[3].cast<unsigned>();
  for (const auto& a : t[4].cast<py::list>()) {
    auto arg = a.cast<py::tuple>();
    l.args.push_back({arg[0].cast<int64_t>(), arg[1].cast<int64_t>(), arg[2].cast<double>()});
  }
  TORCH_CHECK(l.args.size() <= kMaxArgs, "cudacnn planned launch: more than ", kMaxArgs, " kernel parameters");
  return l;
}

Layout to_layout(const py::tuple& t) {
  return {t[0].cast<std::vector<int64_t>>(), t[1].cast<std::vector<int64_t>>(),
          t[2].cast<at::Tensor>().scalar_type()};
}

// plan: (inputs, buffers [(sizes, strides, dtype template)], constants [tensor], launches [(function, grid,
// threads, shared, [(kind, value, real)])], outputs [slot], first (sizes, strides, dtype template) or None)
Plan to_plan(const py::tuple& t) {
  Plan p;
  p.inputs = t[0].cast<int64_t>();
  for (const auto& b : t[1].cast<py::list>()) p.buffers.push_back(to_layout(b.cast<py::tuple>()));
  for (const auto& c : t[2].cast<py::list>()) p.constants.push_back(c.cast<at::Tensor>());
  for (const auto& l : t[3].cast<py::list>()) p.launches.push_back(to_launch(l.cast<py::tuple>()));
  p.outputs = t[4].cast<std::vector<int64_t>>();
  if (!t[5].is_none()) p.first = to_layout(t[5].cast<py::tuple>());
  const int64_t slots = p.inputs + p.buffers.size() + p.constants.size();
  for (const Launch& l : p.launches) {
    for (const Arg& a : l.args) {
      TORCH_CHECK(a.kind != kSlot || (a.value >= 0 && a.value < slots), "cudacnn planned launch: bad slot");
      TORCH_CHECK(a.kind != kScalar || (a.value >= 0 && a.value < 2), "cudacnn planned launch: bad scalar");
    }
  }
  for (int64_t o : p.outputs) TORCH_CHECK(o >= -1 && o < slots, "cudacnn planned launch: bad output slot");
  return p;
}

std::vector<int64_t> key_of(int64_t config, const at::Tensor& x, const std::optional<at::Tensor>& w,
                            const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& r,
                            const std::optional<at::Tensor>& rm, const std::optional<at::Tensor>& rv) {
  return make_key(config, x, opt(w), opt(b), opt(r), opt(rm), opt(rv));
}

void add_plan(const std::vector<int64_t>& key, const py::tuple& forward, const py::tuple& backward) {
  auto pair = std::make_unique<PlanPair>();
  pair->forward = to_plan(forward);
  pair->backward = to_plan(backward);
  TORCH_CHECK(pair->forward.inputs == 6 && pair->forward.outputs.size() == 3 && pair->backward.inputs == 7 &&
                  pair->backward.outputs.size() == 4 && pair->backward.first.has_value(),
              "cudacnn planned launch: a batchnorm_act plan takes 6 inputs to (y, mean, rstd) and 7 to 4 gradients");
  plans().emplace(key, std::move(pair));  // a key already there keeps its pair: autograd nodes may hold it
}

// The op through its plan, or None when no plan has this call's key (the caller records one).
py::object batchnorm_act(int64_t config, const at::Tensor& x, const std::optional<at::Tensor>& w,
                         const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& r,
                         const std::optional<at::Tensor>& rm, const std::optional<at::Tensor>& rv, double momentum,
                         double eps) {
  auto it = plans().find(make_key(config, x, opt(w), opt(b), opt(r), opt(rm), opt(rv)));
  if (it == plans().end()) return py::none();
  c10::cuda::CUDAGuard guard(x.device());
  return py::cast(BatchNormAct::apply(x, w, b, r, rm, rv, momentum, eps, reinterpret_cast<int64_t>(it->second.get())));
}

// A convolution call's key: the fused op's flags, the convolution's tensors and settings and the dtype it
// computes in, and the fused op's other tensors. It fixes the layout of the convolution's output, so it maps to
// the plans of the fused op's key for that output (nullptr: the fused op's call could not be planned).
std::vector<int64_t> conv_key(int64_t config, const at::Tensor& x, const at::Tensor& conv_weight,
                              const at::Tensor& conv_bias, const std::vector<int64_t>& stride,
                              const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                              int64_t groups, const at::Tensor& cast, const at::Tensor& w, const at::Tensor& b,
                              const at::Tensor& r, const at::Tensor& rm, const at::Tensor& rv) {
  std::vector<int64_t> key = make_key(config, x, w, b, r, rm, rv);
  put(key, conv_weight);
  put(key, conv_bias);
  for (const auto* v : {&stride, &padding, &dilation}) {
    key.push_back(static_cast<int64_t>(v->size()));
    key.insert(key.end(), v->begin(), v->end());
  }
  key.push_back(groups);
  key.push_back(cast.defined() ? static_cast<int64_t>(cast.scalar_type()) : -1);
  return key;
}

struct ConvLink {
  const PlanPair* pair;          // nullptr: the fused op's call was not planned, or the link was dropped
  std::vector<int64_t> plan_key;  // the fused op's key, of the convolution's output
};

std::unordered_map<std::vector<int64_t>, ConvLink, KeyHash>& conv_plans() {
  static std::unordered_map<std::vector<int64_t>, ConvLink, KeyHash> table;
  return table;
}

// After a convolution call ran as two calls (F.conv2d, then the fused op on its output y, which recorded that
// key's plans if it could): maps the convolution call's key to them, so that its next calls take one node.
void link_conv(int64_t config, const at::Tensor& x, const at::Tensor& conv_weight,
               const std::optional<at::Tensor>& conv_bias, const std::vector<int64_t>& stride,
               const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, int64_t groups,
               const std::optional<at::Tensor>& cast, const at::Tensor& y, const std::optional<at::Tensor>& w,
               const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& r,
               const std::optional<at::Tensor>& rm, const std::optional<at::Tensor>& rv) {
  auto key = conv_key(config, x, conv_weight, opt(conv_bias), stride, padding, dilation, groups, opt(cast), opt(w),
                      opt(b), opt(r), opt(rm), opt(rv));
  auto plan_key = make_key(config, y, opt(w), opt(b), opt(r), opt(rm), opt(rv));
  auto it = plans().find(plan_key);
  conv_plans().emplace(std::move(key), ConvLink{it == plans().end() ? nullptr : it->second.get(), plan_key});
}

// The convolution and the fused op through one node, or None: no plan is linked to this call's key (the
// caller runs the two calls, then links), or the convolution's output came out in another layout than the
// linked plan's input (then the link is dropped: the key's calls run as the two calls from then on).
py::object conv_batchnorm_act(int64_t config, const at::Tensor& x, const at::Tensor& conv_weight,
                              const std::optional<at::Tensor>& conv_bias, const std::vector<int64_t>& stride,
                              const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                              int64_t groups, const std::optional<at::Tensor>& cast,
                              const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
                              const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& rm,
                              const std::optional<at::Tensor>& rv, double momentum, double eps) {
  auto it = conv_plans().find(conv_key(config, x, conv_weight, opt(conv_bias), stride, padding, dilation, groups,
                                       opt(cast), opt(w), opt(b), opt(r), opt(rm), opt(rv)));
  if (it == conv_plans().end() || it->second.pair == nullptr) return py::none();
  c10::cuda::CUDAGuard guard(x.device());
  ConvCall call{stride, padding, dilation, groups};
  call.bias_grad_is_zero = (config & 1) != 0;  // normalize (this node runs in training only: batch statistics)
  {
    // The node below owns the convolution's backward, and the casts are autocast's, done here once.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const at::Tensor bias = opt(conv_bias);
    if (cast.has_value()) {
      const c10::ScalarType dtype = cast->scalar_type();
      call.x = x.to(dtype);
      call.weight = conv_weight.to(dtype);
      call.bias = bias.defined() ? bias.to(dtype) : bias;
    } else {
      call.x = x;
      call.weight = conv_weight;
      call.bias = bias;
    }
    call.y = at::convolution(call.x, call.weight, call.bias.defined() ? std::optional<at::Tensor>(call.bias)
                                                                        : std::nullopt,
                             stride, padding, dilation, false, std::vector<int64_t>(stride.size(), 0), groups);
  }
  if (make_key(config, call.y, opt(w), opt(b), opt(r), opt(rm), opt(rv)) != it->second.plan_key) {
    it->second.pair = nullptr;  // the key's later calls go straight to the two calls, not computing this twice
    return py::none();
  }
  return py::cast(ConvBatchNormAct::apply(x, conv_weight, conv_bias, w, b, r, rm, rv, momentum, eps,
                                          reinterpret_cast<int64_t>(it->second.pair),
                                          reinterpret_cast<int64_t>(&call)));
}

int64_t plan_count() { return static_cast<int64_t>(plans().size()); }

int64_t conv_link_count() {
  int64_t n = 0;
  for (const auto& entry : conv_plans()) n += entry.second.pair != nullptr;
  return n;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("key_of", &key_of, "the plan key of a batchnorm_act call");
  m.def("add_plan", &add_plan, "register the forward and backward plans of a key");
  m.def("batchnorm_act", &batchnorm_act, "batchnorm_act through its plan, or None without one");
  m.def("plan_count", &plan_count, "plans registered");
  m.def("conv_link_count", &conv_link_count, "convolution call keys linked to plans (they take one node)");
  m.def("link_conv", &link_conv, "map a convolution call's key to the fused op's plans of its output");
  m.def("conv_batchnorm_act", &conv_batchnorm_act, "conv2d + batchnorm_act through one node, or None");
}
