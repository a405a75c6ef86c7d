"""`torch.ops.tlcore.sr_adamw_` / `sr_sgd_`: fused multi-tensor optimizer steps with stochastic rounding.

One call updates every tensor of a (device, dtype, state dtype) group in place: the
update math runs in fp32 and each 16-bit parameter and state is written back with
stochastic rounding (or round-to-nearest-even); fp32 tensors are written exactly.

The contract every backend (Triton, CUDA C++, C++ CPU, the PyTorch path below) meets
bit for bit — csrc/sr_optim.h is its reference text:

* random bits: Philox4x32-10 as Triton's tl.philox_impl, key = (seed lo, seed hi),
  counter = (element lo, element hi, parameter index, step); word 0 rounds the
  parameter, words 1 and 2 the states. The element index is the position in the
  tensor's memory, so results do not depend on block size, grid or thread count;
  the same seed gives the same bits on every backend, run and DDP replica.
* math: fp32 IEEE operations in a fixed order, no FMA contraction, correctly rounded
  division and square root.
* rounding: on integer bit patterns (csrc/sr_optim.h explains the scheme).

Per-tensor arguments:
    hyper:    (T, 8) fp32 CPU. AdamW: decay = 1 - lr*wd, step_size = lr / (1 - beta1^t),
              sqrt(1 - beta2^t), eps, 1 - beta1, beta2, 1 - beta2, 1 / grad_scale.
              SGD: lr, weight_decay, momentum, 1 - dampening, 1 / grad_scale, 0, 0, 0.
    counters: (T, 3) int64 CPU: parameter index, step (Philox counter words 2, 3) and,
              for SGD, 1 when the momentum buffer starts at this step (buffer = grad).
"""
from typing import Sequence  # typing forms: torch.library's schema inference reads them on torch 2.6

import torch

from tlcore import _extension, backend

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HYPER_COLUMNS = 8
MAX_SEED = 2**63  # the ops take the seed as a (signed) int64 schema int
_MASK32 = 0xFFFFFFFF


def _check(where: str, params, grads, states: Sequence[Sequence[torch.Tensor]], hyper, counters, seed) -> None:
    """Validate a multi-tensor step's arguments with clear errors."""
    count = len(params)
    if len(grads) != count or any(len(s) not in (0, count) for s in states):
        raise ValueError(f"{where}: params, grads and states must be lists of one length, got "
                         f"{count}, {len(grads)} and {[len(s) for s in states]}")
    # (contiguous: the kernels read row r at 8 * r)
    if (hyper.dtype != torch.float32 or tuple(hyper.shape) != (count, HYPER_COLUMNS) or hyper.device.type != "cpu"
            or not hyper.is_contiguous()):
        raise ValueError(f"{where}: hyper must be a contiguous fp32 CPU tensor of shape ({count}, {HYPER_COLUMNS}), "
                         f"got {hyper.dtype} {tuple(hyper.shape)} strides {hyper.stride()} on {hyper.device}")
    if (counters.dtype != torch.int64 or tuple(counters.shape) != (count, 3) or counters.device.type != "cpu"
            or not counters.is_contiguous()):
        raise ValueError(f"{where}: counters must be a contiguous int64 CPU tensor of shape ({count}, 3), "
                         f"got {counters.dtype} {tuple(counters.shape)} strides {counters.stride()} on "
                         f"{counters.device}")
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"{where}: seed must be in [0, 2**63), got {seed}")
    if count == 0:
        return
    dtype, device = params[0].dtype, params[0].device
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{where}: parameters have dtype {dtype}; supported are fp32, bf16, fp16")
    state_dtypes = {s[0].dtype for s in states if s}
    if len(state_dtypes) > 1 or not state_dtypes <= {torch.float32, torch.bfloat16}:
        raise TypeError(f"{where}: optimizer states must share one dtype, fp32 or bf16; got {state_dtypes}")
    for i, p in enumerate(params):
        if p.dtype != dtype or p.device != device:
            raise ValueError(f"{where}: parameter {i} is {p.dtype} on {p.device}; one launch takes a single "
                             f"dtype and device ({dtype} on {device})")
        if not is_dense(p):
            raise ValueError(f"{where}: parameter {i} (shape {tuple(p.shape)}, strides {p.stride()}) is not "
                             "dense; the kernels walk each tensor's memory as one run of numel() elements")
        g = grads[i]
        if g.is_sparse or g.is_complex():
            raise TypeError(f"{where}: gradient {i} is {'sparse' if g.is_sparse else 'complex'}; "
                            "only dense real gradients are supported")
        for what, t, want in [("gradient", g, dtype)] + [("state", s[i], s[0].dtype) for s in states if s]:
            if t.dtype != want or t.device != device or t.shape != p.shape or t.stride() != p.stride():
                raise ValueError(f"{where}: {what} {i} must be {want} on {device} with its parameter's shape "
                                 f"{tuple(p.shape)} and strides {p.stride()}; got {t.dtype} on {t.device}, "
                                 f"shape {tuple(t.shape)}, strides {t.stride()}")


def is_dense(t: torch.Tensor) -> bool:
    """True when t's numel() elements fill one gap-free run of memory (in any dimension order)."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements as a 1-d view in memory order (the element index order)."""
    return t.as_strided((t.numel(),), (1,))


# ---- the PyTorch path: the same stream and math with plain tensor ops (int64 holds uint32) ----

def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a uint32 constant and a uint32 tensor, in int64 without overflow."""
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (mid >> 32), mid & _MASK32


def philox_words(seed: int, element: torch.Tensor, index: int, step: int) -> list[torch.Tensor]:
    """Philox4x32-10 words (r0, r1, r2, r3) for int64 element indices; each word int64 in [0, 2^32)."""
    c0, c1 = element & _MASK32, (element >> 32) & _MASK32
    c2 = torch.full_like(element, index & _MASK32)
    c3 = torch.full_like(element, step & _MASK32)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(0xD2511F53, c0)
        hi2, lo2 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return [c0, c1, c2, c3]


def _rounds_up(q: torch.Tensor, rem: torch.Tensor, r: torch.Tensor, stochastic: bool) -> torch.Tensor:
    if stochastic:
        return (r < rem).long()
    return ((rem > 0x80000000) | ((rem == 0x80000000) & ((q & 1) == 1))).long()


def round_to_bits(v: torch.Tensor, r: torch.Tensor, dtype: torch.dtype, stochastic: bool) -> torch.Tensor:
    """fp32 v -> `dtype` (bf16/fp16) with random words r (int64 in [0, 2^32)); csrc/sr_optim.h's scheme."""
    bits = v.view(torch.int32).long() & _MASK32
    sign = (bits >> 16) & 0x8000
    mag = bits & 0x7FFFFFFF
    expo = mag >> 23
    frac = mag & 0x7FFFFF
    if dtype == torch.bfloat16:
        q = mag >> 16
        q = q + _rounds_up(q, (mag << 16) & _MASK32, r, stochastic)
        q = torch.where(expo == 0xFF, torch.where(frac != 0, (mag >> 16) | 0x40, mag >> 16), q)
        out = sign | q
    else:
        m24 = torch.where(expo > 0, frac | 0x800000, frac)
        e_eff = expo.clamp_min(1)
        shift = (126 - e_eff).clamp_min(13)
        near = shift < 32
        q = torch.where(near, m24 >> shift.clamp_max(31), 0)
        rem = torch.where(near, (m24 << (32 - shift.clamp_max(31))) & _MASK32, m24 >> (shift - 32).clamp(0, 31))
        q = q + _rounds_up(q, rem, r, stochastic)
        out = q + torch.where(shift == 13, (e_eff - 113) << 10, 0)
        out = torch.where(expo >= 127 + 16, 0x7C00, out)
        out = torch.where(expo == 0xFF, torch.where(frac != 0, 0x7E00, 0x7C00), out)
        out = sign | out
    return out.to(torch.int16).view(dtype)  # int64 -> int16 keeps the low 16 bits


def _write(dst: torch.Tensor, v: torch.Tensor, r: torch.Tensor, stochastic: bool) -> None:
    flat = _flat(dst)
    flat.copy_(v if dst.dtype == torch.float32 else round_to_bits(v, r, dst.dtype, stochastic))


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IEEE fp32 a / b. torch's CPU kernels turn a scalar divisor into a multiplication by its
    reciprocal; in float64 the quotient of two fp32 values rounds to the correctly rounded fp32."""
    return (a.double() / b.double()).float()


def _sqrt(a: torch.Tensor) -> torch.Tensor:
    """IEEE fp32 sqrt (torch's vectorised CPU sqrt is not always correctly rounded), via float64."""
    return torch.sqrt(a.double()).float()


def _adamw_torch(params, grads, exp_avgs, exp_avg_sqs, hyper, counters, seed, stochastic) -> None:
    for i, p in enumerate(params):
        # 0-dim fp32 scalars: every product below is one fp32 IEEE operation, as in the kernels.
        decay, step_size, bc2_sqrt, eps, omb1, beta2, omb2, inv_scale = hyper[i].unbind()
        g = _flat(grads[i]).float() * inv_scale
        x = _flat(p).float() * decay
        m = _flat(exp_avgs[i]).float()
        v = _flat(exp_avg_sqs[i]).float()
        m = m + omb1 * (g - m)
        v = v * beta2 + omb2 * (g * g)
        denom = _div(_sqrt(v), bc2_sqrt) + eps
        x = x - step_size * _div(m, denom)
        index, step, _ = counters[i].tolist()
        r = philox_words(seed, torch.arange(p.numel(), dtype=torch.int64, device=p.device), index, step)
        _write(p, x, r[0], stochastic)
        _write(exp_avgs[i], m, r[1], stochastic)
        _write(exp_avg_sqs[i], v, r[2], stochastic)


def _sgd_torch(params, grads, momentum_buffers, hyper, counters, nesterov, seed, stochastic) -> None:
    for i, p in enumerate(params):
        lr, weight_decay, momentum, omd, inv_scale = hyper[i, :5].unbind()
        g = _flat(grads[i]).float() * inv_scale
        x = _flat(p).float()
        if weight_decay.item() != 0.0:
            g = g + weight_decay * x
        index, step, fresh = counters[i].tolist()
        r = philox_words(seed, torch.arange(p.numel(), dtype=torch.int64, device=p.device), index, step)
        if momentum_buffers:
            buf = g if fresh else _flat(momentum_buffers[i]).float() * momentum + omd * g
            _write(momentum_buffers[i], buf, r[1], stochastic)
            g = g + momentum * buf if nesterov else buf
        _write(p, x - lr * g, r[0], stochastic)


# ---- the ops ----

_ADAMW = "sr_adamw_"
_SGD = "sr_sgd_"


@torch.library.custom_op("tlcore::sr_adamw_", mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def sr_adamw_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    hyper: torch.Tensor,
    counters: torch.Tensor,
    seed: int,
    stochastic: bool,
) -> None:
    """One AdamW step over T tensors in place (module docstring: hyper, counters, the contract).

    A custom_op rather than a triton_op: the kernels reach the tensors through a table of
    addresses, which a trace of the body could not see, so the op stays opaque to tracing.

    Args:
        params, grads: T dense tensors of one dtype (fp32/bf16/fp16) on one device.
        exp_avgs, exp_avg_sqs: T tensors of one dtype (fp32/bf16), each with its parameter's
            shape and strides.
        hyper: (T, 8) fp32 CPU. counters: (T, 3) int64 CPU. seed: in [0, 2^63).
        stochastic: stochastic rounding (else round-to-nearest-even) of 16-bit outputs.
    """
    _check("tlcore.ops.sr_adamw_", params, grads, [exp_avgs, exp_avg_sqs], hyper, counters, seed)
    if not params:
        return
    if len(exp_avgs) != len(params) or len(exp_avg_sqs) != len(params):
        raise ValueError("tlcore.ops.sr_adamw_: every parameter needs exp_avg and exp_avg_sq")
    chosen = backend.select(_ADAMW, params[0].device, ("triton", "cuda", "cpu", "torch"))
    if chosen == "triton":
        from tlcore.kernels.sr_optim import sr_adamw

        sr_adamw(params, grads, exp_avgs, exp_avg_sqs, hyper, counters, seed, stochastic)
    elif chosen in ("cuda", "cpu"):
        getattr(torch.ops.tlcore, f"_sr_adamw_{chosen}")(params, grads, exp_avgs, exp_avg_sqs, hyper, counters,
                                                         seed, stochastic)
    else:
        _adamw_torch(params, grads, exp_avgs, exp_avg_sqs, hyper, counters, seed, stochastic)


@sr_adamw_.register_fake
def _sr_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, hyper, counters, seed, stochastic):
    _check("tlcore.ops.sr_adamw_", params, grads, [exp_avgs, exp_avg_sqs], hyper, counters, seed)


@torch.library.custom_op("tlcore::sr_sgd_", mutates_args=("params", "momentum_buffers"))
def sr_sgd_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    hyper: torch.Tensor,
    counters: torch.Tensor,
    nesterov: bool,
    seed: int,
    stochastic: bool,
) -> None:
    """One SGD step over T tensors in place (module docstring: hyper, counters, the contract).

    Args:
        params, grads: as sr_adamw_.
        momentum_buffers: empty for momentum 0, else T tensors of one dtype (fp32/bf16).
        nesterov: Nesterov momentum. hyper, counters, seed, stochastic: as sr_adamw_.
    """
    _check("tlcore.ops.sr_sgd_", params, grads, [momentum_buffers], hyper, counters, seed)
    if not params:
        return
    chosen = backend.select(_SGD, params[0].device, ("triton", "cuda", "cpu", "torch"))
    if chosen == "triton":
        from tlcore.kernels.sr_optim import sr_sgd

        sr_sgd(params, grads, momentum_buffers, hyper, counters, nesterov, seed, stochastic)
    elif chosen in ("cuda", "cpu"):
        getattr(torch.ops.tlcore, f"_sr_sgd_{chosen}")(params, grads, momentum_buffers, hyper, counters,
                                                       nesterov, seed, stochastic)
    else:
        _sgd_torch(params, grads, momentum_buffers, hyper, counters, nesterov, seed, stochastic)


@sr_sgd_.register_fake
def _sr_sgd_fake(params, grads, momentum_buffers, hyper, counters, nesterov, seed, stochastic):
    _check("tlcore.ops.sr_sgd_", params, grads, [momentum_buffers], hyper, counters, seed)


def _register_compiled_fakes() -> None:
    """Fake twins of the compiled kernels (tlcore::_sr_*_cpu / _cuda): they validate and return nothing."""
    if not _extension.loaded():
        return
    for device in ("cpu", "cuda"):
        torch.library.register_fake(f"tlcore::_sr_adamw_{device}")(_sr_adamw_fake)
        torch.library.register_fake(f"tlcore::_sr_sgd_{device}")(_sr_sgd_fake)


_register_compiled_fakes()
