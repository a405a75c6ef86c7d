"""Stochastic-rounding AdamW / SGD steps as multi-tensor Triton kernels.

    slots:  (T, 8) int64  one row per tensor: param, grad, state0, state1 addresses,
                          numel, parameter index, step, fresh (the Slot struct of csrc/sr_optim.h)
    hyper:  (T, 8) fp32   per-tensor hyper-parameters (column order: csrc/sr_optim.h)
    chunks: (C, 2) int64  (slot row, first element) of the chunk each program updates

Parameters, gradients and states are reached through the addresses in `slots`, so
one launch updates every tensor of a (device, dtype, state dtype) group whatever
their number and sizes (apex's multi_tensor_apply idea, with the tensor list in
device memory instead of kernel arguments). Each tensor must be dense: its numel()
elements lie consecutively from data_ptr(), in memory order, and that position is the
element index of the random stream.

This file mirrors csrc/sr_optim.h operation for operation (the module docstring of
tlcore/ops/optim.py states the contract): Philox4x32-10 through tl.philox_impl with
counter (element lo, element hi, parameter index, step) and key (seed lo, seed hi),
fp32 math with div_rn / sqrt_rn, launched with enable_fp_fusion=False so that no
a*b+c becomes an FMA, and rounding to 16 bits done on integer bit patterns.
"""
import torch
import triton
import triton.language as tl

from tlcore.backend import interpreting

FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SLOT_COLUMNS = 8


def _chunking() -> tuple[int, int]:
    """(elements per program, elements per inner step)."""
    if interpreting():
        return 1 << 13, 1 << 13  # numpy per program: one wide block per program
    return 1 << 16, 1024


@triton.jit
def _pointer(address, FORMAT: tl.constexpr):
    # 16-bit values travel as uint16 bit patterns: the rounding below writes bits, and
    # the interpreter's numpy has no bf16.
    if FORMAT == 0:
        ptr = address.to(tl.pointer_type(tl.float32))
    else:
        ptr = address.to(tl.pointer_type(tl.uint16))
    return ptr


@triton.jit
def _load(ptr, offs, mask, FORMAT: tl.constexpr):
    """fp32 block of the values at ptr + offs (exact for every format)."""
    if FORMAT == 0:
        v = tl.load(ptr + offs, mask=mask, other=0.0)
    elif FORMAT == 1:
        v = (tl.load(ptr + offs, mask=mask, other=0).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        v = tl.load(ptr + offs, mask=mask, other=0).to(tl.float16, bitcast=True).to(tl.float32)
    return v


@triton.jit
def _rounds_up(q, rem, r, STOCHASTIC: tl.constexpr):
    if STOCHASTIC:
        up = r < rem  # P(up) = rem / 2^32: unbiased
    else:
        up = (rem > 0x80000000) | ((rem == 0x80000000) & ((q & 1) == 1))  # nearest, ties to even
    return up


@triton.jit
def _round_bf16(v, r, STOCHASTIC: tl.constexpr):
    """fp32 -> bf16 bit patterns (uint32 block); csrc/sr_optim.h round_bf16."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = (bits >> 16) & 0x8000
    mag = bits & 0x7FFFFFFF
    q = mag >> 16
    q = q + _rounds_up(q, mag << 16, r, STOCHASTIC).to(tl.uint32)  # 0x7F7F + 1 is inf
    special = (mag >> 23) == 0xFF  # inf stays inf, NaN stays a (quiet) NaN
    q = tl.where(special, tl.where((mag & 0x7FFFFF) != 0, (mag >> 16) | 0x40, mag >> 16), q)
    return sign | q


@triton.jit
def _round_fp16(v, r, STOCHASTIC: tl.constexpr):
    """fp32 -> fp16 bit patterns (uint32 block); csrc/sr_optim.h round_fp16."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = (bits >> 16) & 0x8000
    mag = bits & 0x7FFFFFFF
    expo = (mag >> 23).to(tl.int32)
    frac = mag & 0x7FFFFF
    m24 = tl.where(expo > 0, frac | 0x800000, frac)
    e_eff = tl.maximum(expo, 1)
    shift = tl.maximum(126 - e_eff, 13)  # bits of m24 below one fp16 ulp (more for subnormals)
    near = shift < 32
    shift_lo = tl.minimum(shift, 31).to(tl.uint32)
    shift_hi = tl.minimum(tl.maximum(shift - 32, 0), 31).to(tl.uint32)
    q = tl.where(near, m24 >> shift_lo, 0).to(tl.uint32)
    rem = tl.where(near, m24 << (32 - shift_lo), m24 >> shift_hi).to(tl.uint32)
    q = q + _rounds_up(q, rem, r, STOCHASTIC).to(tl.uint32)
    exponent = tl.where(shift == 13, (e_eff - 113) << 10, 0).to(tl.uint32)
    out = q + exponent  # a carry out of q bumps the exponent (to inf past 65504)
    out = tl.where(expo >= 127 + 16, 0x7C00, out)  # |v| >= 2^16
    out = tl.where(expo == 0xFF, tl.where(frac != 0, 0x7E00, 0x7C00), out)
    return sign | out.to(tl.uint32)


@triton.jit
def _store(ptr, offs, mask, v, r, FORMAT: tl.constexpr, STOCHASTIC: tl.constexpr):
    if FORMAT == 0:
        tl.store(ptr + offs, v, mask=mask)
    elif FORMAT == 1:
        tl.store(ptr + offs, _round_bf16(v, r, STOCHASTIC).to(tl.uint16), mask=mask)
    else:
        tl.store(ptr + offs, _round_fp16(v, r, STOCHASTIC).to(tl.uint16), mask=mask)


@triton.jit
def _random_words(seed_lo, seed_hi, offs, index, step):
    """Philox4x32-10 words for elements `offs` (int64) of parameter `index` at `step`."""
    c0 = offs.to(tl.uint32)
    zero = c0 * 0
    c1 = (offs >> 32).to(tl.uint32)
    c2 = zero + index.to(tl.uint32)
    c3 = zero + step.to(tl.uint32)
    k0 = zero + seed_lo.to(tl.uint32)
    k1 = zero + seed_hi.to(tl.uint32)
    return tl.philox_impl(c0, c1, c2, c3, k0, k1, 10)


# seeds vary per run: specialising on their values (1, multiples of 16) would only recompile
@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _sr_adamw_kernel(
    slots_ptr, hyper_ptr, chunks_ptr, seed_lo, seed_hi,
    PARAM_FORMAT: tl.constexpr, STATE_FORMAT: tl.constexpr, STOCHASTIC: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(chunks_ptr + 2 * pid)
    first = tl.load(chunks_ptr + 2 * pid + 1)
    slot = slots_ptr + row * 8
    p_ptr = _pointer(tl.load(slot + 0), PARAM_FORMAT)
    g_ptr = _pointer(tl.load(slot + 1), PARAM_FORMAT)
    m_ptr = _pointer(tl.load(slot + 2), STATE_FORMAT)
    v_ptr = _pointer(tl.load(slot + 3), STATE_FORMAT)
    end = tl.minimum(first + CHUNK, tl.load(slot + 4))
    index = tl.load(slot + 5)
    step = tl.load(slot + 6)
    h = hyper_ptr + row * 8
    decay = tl.load(h + 0)
    step_size = tl.load(h + 1)
    bias_correction2_sqrt = tl.load(h + 2)
    eps = tl.load(h + 3)
    one_minus_beta1 = tl.load(h + 4)
    beta2 = tl.load(h + 5)
    one_minus_beta2 = tl.load(h + 6)
    inv_scale = tl.load(h + 7)
    for start in range(first, end, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < end
        g = _load(g_ptr, offs, mask, PARAM_FORMAT) * inv_scale
        p = _load(p_ptr, offs, mask, PARAM_FORMAT)
        m = _load(m_ptr, offs, mask, STATE_FORMAT)
        v = _load(v_ptr, offs, mask, STATE_FORMAT)
        p = p * decay
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + one_minus_beta2 * (g * g)
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        p = p - step_size * tl.div_rn(m, denom)
        r0, r1, r2, _ = _random_words(seed_lo, seed_hi, offs, index, step)
        _store(p_ptr, offs, mask, p, r0, PARAM_FORMAT, STOCHASTIC)
        _store(m_ptr, offs, mask, m, r1, STATE_FORMAT, STOCHASTIC)
        _store(v_ptr, offs, mask, v, r2, STATE_FORMAT, STOCHASTIC)


# seeds vary per run: specialising on their values (1, multiples of 16) would only recompile
@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _sr_sgd_kernel(
    slots_ptr, hyper_ptr, chunks_ptr, seed_lo, seed_hi,
    PARAM_FORMAT: tl.constexpr, STATE_FORMAT: tl.constexpr, STOCHASTIC: tl.constexpr,
    MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(chunks_ptr + 2 * pid)
    first = tl.load(chunks_ptr + 2 * pid + 1)
    slot = slots_ptr + row * 8
    p_ptr = _pointer(tl.load(slot + 0), PARAM_FORMAT)
    g_ptr = _pointer(tl.load(slot + 1), PARAM_FORMAT)
    b_ptr = _pointer(tl.load(slot + 2), STATE_FORMAT)
    end = tl.minimum(first + CHUNK, tl.load(slot + 4))
    index = tl.load(slot + 5)
    step = tl.load(slot + 6)
    fresh = tl.load(slot + 7) != 0
    h = hyper_ptr + row * 8
    lr = tl.load(h + 0)
    weight_decay = tl.load(h + 1)
    momentum = tl.load(h + 2)
    one_minus_dampening = tl.load(h + 3)
    inv_scale = tl.load(h + 4)
    for start in range(first, end, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < end
        g = _load(g_ptr, offs, mask, PARAM_FORMAT) * inv_scale
        p = _load(p_ptr, offs, mask, PARAM_FORMAT)
        g = tl.where(weight_decay != 0.0, g + weight_decay * p, g)  # torch skips it at 0 (inf * 0 is NaN)
        r0, r1, _, _ = _random_words(seed_lo, seed_hi, offs, index, step)
        if MOMENTUM:
            old = _load(b_ptr, offs, mask, STATE_FORMAT)
            buf = tl.where(fresh, g, old * momentum + one_minus_dampening * g)
            _store(b_ptr, offs, mask, buf, r1, STATE_FORMAT, STOCHASTIC)
            if NESTEROV:
                g = g + momentum * buf
            else:
                g = buf
        p = p - lr * g
        _store(p_ptr, offs, mask, p, r0, PARAM_FORMAT, STOCHASTIC)


def _tables(tensors: list[list[torch.Tensor]], counters: torch.Tensor, device: torch.device, chunk: int):
    """The slot and chunk tables of one launch, on `device`.

    tensors: [params, grads, state0s, state1s]; an empty list leaves its column 0.
    counters: (T, 3) int64 CPU, (parameter index, step, fresh) per tensor.
    """
    count = len(tensors[0])
    slots = torch.zeros(count, SLOT_COLUMNS, dtype=torch.int64)
    for column, column_tensors in enumerate(tensors):
        if column_tensors:
            slots[:, column] = torch.tensor([t.data_ptr() for t in column_tensors], dtype=torch.int64)
    numels = [p.numel() for p in tensors[0]]
    slots[:, 4] = torch.tensor(numels, dtype=torch.int64)
    slots[:, 5:8] = counters
    rows = [(t, first) for t, n in enumerate(numels) for first in range(0, n, chunk)]
    chunks = torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)
    return slots.to(device, non_blocking=True), chunks.to(device, non_blocking=True)


def _launch(kernel, tensors, hyper, counters, seed, **constexprs):
    params = tensors[0]
    if not params:
        return
    device = params[0].device
    chunk, block = _chunking()
    slots, chunks = _tables(tensors, counters, device, chunk)
    if chunks.shape[0] == 0:
        return
    kernel[(chunks.shape[0],)](
        slots, hyper.to(device, non_blocking=True), chunks, seed & 0xFFFFFFFF, seed >> 32,
        CHUNK=chunk, BLOCK=block, enable_fp_fusion=False, **constexprs,
    )


def sr_adamw(params, grads, exp_avgs, exp_avg_sqs, hyper, counters, seed: int, stochastic: bool) -> None:
    """One AdamW step over every tensor of the lists (one launch), in place.

    params, grads: T dense tensors of one dtype (fp32/bf16/fp16); exp_avgs, exp_avg_sqs:
    T tensors of one state dtype with their parameter's shape and strides.
    hyper: (T, 8) fp32 CPU; counters: (T, 3) int64 CPU; seed in [0, 2^63).
    """
    _launch(_sr_adamw_kernel, [params, grads, exp_avgs, exp_avg_sqs], hyper, counters, seed,
            PARAM_FORMAT=FORMATS[params[0].dtype] if params else 0,
            STATE_FORMAT=FORMATS[exp_avgs[0].dtype] if params else 0, STOCHASTIC=stochastic)


def sr_sgd(params, grads, momentum_buffers, hyper, counters, nesterov: bool, seed: int, stochastic: bool) -> None:
    """One SGD step over every tensor of the lists (one launch), in place.

    momentum_buffers: empty (momentum 0) or T tensors of one state dtype. Other
    arguments as sr_adamw.
    """
    _launch(_sr_sgd_kernel, [params, grads, momentum_buffers, []], hyper, counters, seed,
            PARAM_FORMAT=FORMATS[params[0].dtype] if params else 0,
            STATE_FORMAT=FORMATS[momentum_buffers[0].dtype] if momentum_buffers else 0,
            STOCHASTIC=stochastic, MOMENTUM=bool(momentum_buffers), NESTEROV=nesterov)
