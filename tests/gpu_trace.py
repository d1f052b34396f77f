"""Starts of scripts that the run_compiled_triton fixture runs in a subprocess, to check our Triton kernels as
an H100 run would, without one.

TRACE_PRELUDE: traces our ops as Inductor would (a stand-in driver reports the target, tensors are fake; `batch`
is a symbolic size); `kernels(fn, *args)` lists (kernel name, tensors Inductor must clone) for each Triton kernel
fn launches.
COMPILE_PRELUDE: `build(fn, consts, warps, unit_strides, pointers)` compiles a kernel for sm_90."""

TRACE_PRELUDE = r"""
import json
import torch
import triton
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch._dynamo.source import ConstantSource
from triton.backends.compiler import GPUTarget
from cudacnn.kernels import batchnorm as B, ops

class Driver:  # what Inductor's analysis of the kernels asks the driver: the target it compiles for
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

triton.runtime.driver.set_active(Driver())
B._multiprocessors = lambda device: 132  # an H100's
shape_env = ShapeEnv()
mode = FakeTensorMode(shape_env=shape_env)
# a batch size as a graph compiled for any batch size sees it (torch.compile's dynamic shapes), hinted 8
batch = shape_env.create_symintnode(shape_env.create_symbol(8, ConstantSource("batch")), hint=8)

def fake(*shape, dtype=torch.float32):
    with mode:
        t = torch.empty(*shape, dtype=dtype, device="meta")
        t = t.contiguous(memory_format=torch.channels_last) if len(shape) == 4 else t
    t.fake_device = torch.device("cuda", 0)
    return t

def batch_specialized():  # tracing pinned `batch` to its hint (e.g. through int()): a dynamic graph must not
    return shape_env.replace(batch.node.expr).is_number

def kernels(fn, *args):
    with mode:
        graph = make_fx(dispatch_functionalize(fn))(*args)
    return [(kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__, sorted(n.kwargs["tensors_to_clone"]))
            for n in graph.graph.nodes if "triton_kernel_wrapper" in str(n.target)]

"""

COMPILE_PRELUDE = r"""
import functools
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def build(fn, consts, warps=8, unit_strides=(), pointers={}):
    # consts: the constexprs; unit_strides: the channel strides of NHWC tensors, which Triton specializes as 1;
    # pointers: each pointer's type by name without "_ptr" (else *fp32); other scalars i32, momentum and eps fp32
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in consts:
            signature[name], constexprs[(i,)] = "constexpr", consts[name]
        elif name in unit_strides:
            signature[name], constexprs[(i,)] = "constexpr", 1
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name[:-4], "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in ("momentum", "eps") else "i32"
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
"""
