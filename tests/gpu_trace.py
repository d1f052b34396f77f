"""The start of a script (run in a subprocess by the run_compiled_triton fixture) that traces our Triton ops as
Inductor would for an H100, without one: a stand-in driver reports the target, tensors are fake.
`kernels(fn, *args)` lists (kernel name, tensors Inductor must clone) for each Triton kernel fn launches."""

TRACE_PRELUDE = r"""
import json
import torch
import triton
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from triton.backends.compiler import GPUTarget
from cudacnn.kernels import batchnorm as B, ops

class Driver:  # what Inductor's analysis of the kernels asks the driver: the target it compiles for
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

triton.runtime.driver.set_active(Driver())
B._multiprocessors = lambda device: 132  # an H100's
mode = FakeTensorMode()

def fake(*shape, dtype=torch.float32):
    t = torch.empty(*shape, dtype=dtype, device="meta")
    t = t.contiguous(memory_format=torch.channels_last) if len(shape) == 4 else t
    return FakeTensor(mode, t, torch.device("cuda", 0))

def kernels(fn, *args):
    with mode:
        graph = make_fx(dispatch_functionalize(fn))(*args)
    return [(kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__, sorted(n.kwargs["tensors_to_clone"]))
            for n in graph.graph.nodes if "triton_kernel_wrapper" in str(n.target)]

"""
