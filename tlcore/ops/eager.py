"""When a tlcore op may skip torch's dispatcher and run its implementation as a plain call.

Through `torch.ops.tlcore.*`, a triton_op's eager call costs ~60 us of host time on an H100
machine (its Python autograd and backend layers; bench/NOTES.md, session 39), a quarter of a
fused conv's. Models run host-bound in eager mode, so the public wrappers call the
implementation directly wherever the dispatcher would do nothing but call it.
"""
import torch


def skips_dispatcher(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether an op on these tensors may run its implementation without torch's dispatcher: a plain
    eager call (plain_eager_call) on GPU tensors. CPU calls keep the dispatcher: their C++ kernels
    dwarf its cost."""
    return x.is_cuda and plain_eager_call(x, *others)


def traced(x: torch.Tensor) -> bool:
    """Whether a call on x is being traced or transformed rather than run: torch.compile and
    torch.export (their tensors are not plain ones), a dispatch mode recording it (FakeTensorMode,
    make_fx), or a functorch transform (vmap)."""
    return type(x) is not torch.Tensor or torch.compiler.is_compiling() \
        or bool(torch._C._len_torch_dispatch_stack()) or torch._C._functorch.is_functorch_wrapped_tensor(x)


def plain_eager_call(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether the dispatcher would do nothing for an op on these tensors but call its implementation:
    not traced, no function mode active (a `with torch.device(...)` block), no profiler (which lists
    the op by name), and nothing that needs gradients.
    """
    if traced(x) or torch._C._is_torch_function_mode_enabled() or torch._C._autograd._profiler_enabled():
        return False
    needs_grad = x.requires_grad or any(t is not None and t.requires_grad for t in others)
    return not (needs_grad and torch.is_grad_enabled())
