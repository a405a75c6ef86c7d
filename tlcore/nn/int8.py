"""Modules of an INT8 model built by `tlcore.quantize`: int8 NHWC activations between layers.

Every activation tensor is int8 (N, C, H, W) channels_last with one (scale, zero_point)
per tensor; each module knows the quantization of its input and output. The integer
parameters are buffers and the per-layer constants are "extra state", so a model rebuilt
by `tlcore.quantize` loads a saved state_dict with `torch.load(..., weights_only=True)`.
"""
import contextlib
from typing import NamedTuple

import torch
from torch import nn
from torch.ao.quantization import PerChannelMinMaxObserver
from torch.nn.utils.fusion import fuse_conv_bn_weights

from tlcore.backend import use_backend
from tlcore.nn.conv import FusedConv2dBNReLU, explicit_padding, folding_unsupported_reason
from tlcore.ops.int8 import CONV_OP, QMAX, WEIGHT_QMAX, cached_packed_weight_cpu, int8_conv2d, requantization
from tlcore.ops.int8_cpu import runs_cpu_kernel
from tlcore.ops.int8_layers import (QUANTIZE_BACKENDS, dequantize_per_tensor, int8_global_avg_pool, int8_max_pool2d,
                                    int8_weight_linear, quantize_input)
from tlcore.ops.weight_derived import forget_derived_values


class QParams(NamedTuple):
    """The quantization of one activation tensor: x = scale * (q - zero_point), q <= qmax.

    qmax is 127, or -1 for 7-bit activations (reduce_range).
    """

    scale: float
    zero_point: int
    qmax: int = 127


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, ...) float -> (int8 (K, ...) in [-127, 127], fp32 (K,) scales); a conv's (K, C, R, S)
    comes back channels_last, an fc's (K, C) contiguous.

    Symmetric per output channel: scale[k] = max|w[k]| / 127 (torch.ao's per-channel observer).
    """
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                        quant_min=-WEIGHT_QMAX, quant_max=WEIGHT_QMAX)
    observer(weight.detach().float())
    scale, _ = observer.calculate_qparams()
    scale = scale.to(weight.device, torch.float32)
    per_channel = scale.view(-1, *[1] * (weight.dim() - 1))
    q = torch.round(weight.detach().float() / per_channel).clamp(-WEIGHT_QMAX, WEIGHT_QMAX).to(torch.int8)
    return (q.contiguous(memory_format=torch.channels_last) if q.dim() == 4 else q), scale


class _Int8Module(nn.Module):
    """Keeps the per-layer constants (ints, floats, bools, lists) in `state` and in the state_dict.

    `backend` forces a tlcore backend for the module's op when the op has it (IMPLEMENTED) and runs
    eagerly (where that backend cannot run, e.g. cuda on CPU tensors, the op warns and uses its
    default); otherwise the caller's choice (`use_backend`, TLCORE_BACKEND) or the op's default applies.
    """

    IMPLEMENTED: tuple[str, ...] = ("triton", "torch")

    def __init__(self, **state):
        super().__init__()
        self.state = state
        self.backend: str | None = None  # tlcore backend forced for this module's ops

    def _apply(self, fn, recurse=True):
        # The fp32 buffers (weight scales, the fc's bias) belong to the integer arithmetic: a
        # model.half(), .double() or .to(dtype) must not round them (the kernels take fp32 only),
        # so they follow the model to its device and keep their dtype and values.
        floats = {name: b for name, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, before in floats.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    def get_extra_state(self) -> dict:
        return dict(self.state)

    def set_extra_state(self, state: dict) -> None:
        if set(state) != set(self.state):
            raise ValueError(f"{type(self).__name__}: state_dict holds {sorted(state)}, expected {sorted(self.state)}"
                             " (rebuild the model with tlcore.quantize before loading)")
        self.state = dict(state)

    def _backend(self):
        # Traced (torch.compile, torch.export), the public ops pick their backend at trace time
        # (TLCORE_BACKEND): the module's own cannot apply there, as the context manager does not
        # trace, but every backend computes the same codes.
        if self.backend not in self.IMPLEMENTED or torch.compiler.is_compiling():
            return _CALLERS_BACKEND
        return use_backend(self.backend)


_CALLERS_BACKEND = contextlib.nullcontext()  # (reusable: it holds no state)


class QuantizeInput(_Int8Module):
    """float (N, C, H, W) -> int8 (N, C, H, W) channels_last with the calibrated input scale.

    `check_finite` (a setting, not saved): raise ValueError on NaN or inf (tlcore.ops.quantize_input).
    """

    IMPLEMENTED = QUANTIZE_BACKENDS
    check_finite = True  # (a class default: modules pickled before the setting have it too)

    def __init__(self, qparams: QParams):
        super().__init__(scale=float(qparams.scale), zero_point=int(qparams.zero_point))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._backend():
            return quantize_input(x, self.state["scale"], self.state["zero_point"], self.check_finite)

    @property
    def output_qparams(self) -> QParams:
        return QParams(self.state["scale"], self.state["zero_point"], QMAX)

    def extra_repr(self) -> str:
        return f"scale={self.state['scale']:.4g}, zero_point={self.state['zero_point']}"


class DequantizeOutput(_Int8Module):
    """int8 (N, C, H, W) -> fp32 (N, C, H, W)."""

    def __init__(self, qparams: QParams):
        super().__init__(scale=float(qparams.scale), zero_point=int(qparams.zero_point))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        with self._backend():
            return dequantize_per_tensor(q, self.state["scale"], self.state["zero_point"])

    def extra_repr(self) -> str:
        return f"scale={self.state['scale']:.4g}, zero_point={self.state['zero_point']}"


class Int8GlobalAvgPool(DequantizeOutput):
    """A ResNet's average pool on its int8 features, into fp32 for the fc.

    forward(q: int8 (N, C, H, W)) -> fp32 (N, C, 1, 1) = scale * (mean of the codes - zero_point).
    The codes are summed in int32 (exact) and scaled once, instead of dequantizing a full fp32
    copy first: a tenth of the time (ResNet-50's 2048 x 7 x 7 features).
    """

    IMPLEMENTED = ("cpu", "torch")

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        with self._backend():
            return int8_global_avg_pool(q, self.state["scale"], self.state["zero_point"])


class Int8Linear(_Int8Module):
    """A ResNet's fc on int8 weights (symmetric per output row); fp32 features in, fp32 logits out.

    forward(x: fp32 (N, C)) -> fp32 (N, K) = x @ (w_scale[:, None] * weight).T + bias.
    Buffers: weight int8 (K, C), w_scale fp32 (K,), bias fp32 (K,).
    """

    IMPLEMENTED = ("cpu", "torch")

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features=in_features, out_features=out_features)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features))

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        weight_q, w_scale = quantize_weight(linear.weight)
        module = cls(linear.in_features, linear.out_features).to(linear.weight.device)
        with torch.no_grad():
            module.weight.copy_(weight_q)
            module.w_scale.copy_(w_scale)
            if linear.bias is not None:
                module.bias.copy_(linear.bias.float())
        return module

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # An fc saved in float (tlcore.quantize(skip=("fc",)), or an int8 model saved before its fc
        # was int8) loads quantized, exactly as from_float would have made it.
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.is_floating_point() and prefix + "w_scale" not in state_dict:
            state_dict[prefix + "weight"], state_dict[prefix + "w_scale"] = quantize_weight(weight)
            state_dict.setdefault(prefix + "bias", torch.zeros(weight.shape[0]))
            state_dict.setdefault(prefix + "_extra_state", dict(self.state))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers  # nn.Module attribute lookups of buffers cost ~0.5 us each
        with self._backend():
            return int8_weight_linear(x, buffers["weight"], buffers["w_scale"], buffers["bias"])

    def extra_repr(self) -> str:
        return f"in_features={self.state['in_features']}, out_features={self.state['out_features']}, int8 weights"


class FoldedConv(NamedTuple):
    """A conv with its BatchNorm folded in, in fp32: weight (K, C / groups, R, S), bias (K,)."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    relu: bool


def fold_conv_stage(stage: nn.Module) -> FoldedConv | None:
    """`stage` folded, if it is a conv stage the int8 scheme covers, else None.

    Covered: a FusedConv2dBNReLU, and a conv -> BatchNorm2d (-> ReLU) nn.Sequential that tlcore.fuse
    left stock only because its fp16 kernel has no grouped convs (ResNeXt's grouped 3x3): zero
    padding, BN with running statistics. The BN folding is torch.nn.utils.fusion's. Conv2d
    subclasses are not covered: their forward may not be a plain conv (e.g. weight standardization).
    """
    if isinstance(stage, FusedConv2dBNReLU):
        return FoldedConv(stage.weight.detach().float() * stage.scale.view(-1, 1, 1, 1), stage.shift.detach().float(),
                          stage.stride, stage.padding, stage.dilation, 1, bool(stage.relu))
    if not (isinstance(stage, nn.Sequential) and len(stage) in (2, 3)):
        return None
    conv, bn, relu = stage[0], stage[1], len(stage) == 3
    if folding_unsupported_reason(conv, bn) or conv.padding_mode != "zeros" or (relu and type(stage[2]) is not nn.ReLU):
        return None
    optional = lambda t: None if t is None else t.detach().float()  # noqa: E731
    weight, bias = fuse_conv_bn_weights(conv.weight.detach().float(), optional(conv.bias), bn.running_mean.float(),
                                        bn.running_var.float(), bn.eps, optional(bn.weight), optional(bn.bias))
    return FoldedConv(weight.detach(), bias.detach(), tuple(conv.stride), explicit_padding(conv),
                      tuple(conv.dilation), conv.groups, relu)


class Int8Conv2d(_Int8Module):
    """Quantized conv + folded BN (+ int8 residual) (+ ReLU): int8 in, int8 out, one kernel.

    forward(x: int8 (N, C, H, W), residual: int8 (N, K, OH, OW) or None) -> int8 (N, K, OH, OW) channels_last.
    Buffers: weight int8 (K, C / groups, R, S) channels_last, w_scale fp32 (K,), multiplier int32 (K,),
    offset int64 (K,).
    """

    IMPLEMENTED = ("triton", "cuda", "cpu", "torch")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, groups: int = 1, **state):
        super().__init__(in_channels=in_channels, out_channels=out_channels, kernel_size=list(kernel_size),
                         groups=groups, **state)
        k = out_channels
        self.register_buffer("weight", torch.zeros(k, in_channels // groups, *kernel_size, dtype=torch.int8).contiguous(
            memory_format=torch.channels_last))
        self.register_buffer("w_scale", torch.ones(k))
        self.register_buffer("multiplier", torch.zeros(k, dtype=torch.int32))
        self.register_buffer("offset", torch.zeros(k, dtype=torch.int64))

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state({"groups": 1, **state})  # saved before grouped convs were covered

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # The weight changed in place: under torch.inference_mode its version counter does not
        # count that, and the kernels' cached values (the C++ packing, the Triton border corrections)
        # would go on with the old weights.
        forget_derived_values(self._buffers["weight"])

    def __setstate__(self, state: dict) -> None:  # a whole pickled module, saved before groups
        super().__setstate__(state)
        self.state.setdefault("groups", 1)

    @classmethod
    def from_folded(cls, folded: FoldedConv, x_q: QParams, out_q: QParams, res_q: QParams | None = None):
        """Quantize a folded conv (fold_conv_stage) for the given activation qparams."""
        weight_q, w_scale = quantize_weight(folded.weight)
        multiplier, offset, shift, res_multiplier = requantization(
            x_q.scale, x_q.zero_point, weight_q, w_scale, folded.bias, out_q.scale, out_q.zero_point,
            None if res_q is None else res_q.scale, 0 if res_q is None else res_q.zero_point)
        k, c_group, r, s = folded.weight.shape
        module = cls(c_group * folded.groups, k, (r, s), folded.groups,
                     stride=list(folded.stride), padding=list(folded.padding), dilation=list(folded.dilation),
                     relu=folded.relu, residual=res_q is not None,
                     x_scale=float(x_q.scale), x_zero=int(x_q.zero_point),
                     out_scale=float(out_q.scale), out_zero=int(out_q.zero_point),
                     res_scale=0.0 if res_q is None else float(res_q.scale),
                     res_zero=0 if res_q is None else int(res_q.zero_point),
                     shift=shift, res_multiplier=res_multiplier, out_max=int(out_q.qmax), x_max=int(x_q.qmax))
        module.to(folded.weight.device)
        with torch.no_grad():
            module.weight.copy_(weight_q)
            module.w_scale.copy_(w_scale)
            module.multiplier.copy_(multiplier)
            module.offset.copy_(offset)
        return module

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        s = self.state
        if (residual is not None) != s["residual"]:
            raise ValueError(f"Int8Conv2d was calibrated {'with' if s['residual'] else 'without'} a residual")
        with self._backend():
            # Traced (torch.compile, torch.export): the public op, which packs CPU weights itself
            # (cached per weight) and picks the instruction set where the graph runs.
            traced = torch.compiler.is_compiling()
            if not traced and runs_cpu_kernel(CONV_OP, x, self.IMPLEMENTED):
                return self._forward_cpu(x, residual)
            return int8_conv2d(x, s["x_zero"], self.weight, self.multiplier, self.offset, s["shift"],
                               residual=residual, res_multiplier=s["res_multiplier"], out_zero=s["out_zero"],
                               relu=s["relu"], stride=s["stride"], padding=s["padding"], dilation=s["dilation"],
                               out_max=s["out_max"], x_max=s["x_max"],
                               packed_weight=None if traced else self._packed_weight()[2], groups=s["groups"])

    @property
    def output_qparams(self) -> QParams:
        s = self.state
        return QParams(s["out_scale"], s["out_zero"], s["out_max"])

    def _forward_cpu(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The C++ kernel straight from its op: the public op's Python checks of arguments this
        module built itself cost as much as a batch-1 conv (the C++ op checks x and residual)."""
        s, buffers = self.state, self._buffers  # nn.Module attribute lookups of buffers cost ~0.5 us each
        isa, algorithm, packed = self._packed_weight()
        nhwc = torch.channels_last
        return torch.ops.tlcore._int8_conv_cpu(
            x.contiguous(memory_format=nhwc), s["x_zero"], buffers["weight"].contiguous(memory_format=nhwc),
            buffers["multiplier"].contiguous(), buffers["offset"].contiguous(), s["shift"],
            None if residual is None else residual.contiguous(memory_format=nhwc), s["res_multiplier"],
            s["out_zero"], s["relu"], s["stride"], s["padding"], s["dilation"], s["out_max"], packed, isa, algorithm,
            s["groups"])

    def _packed_weight(self) -> tuple[int | None, int | None, torch.Tensor | None]:
        """(isa, algorithm, the weight in that C++ CPU kernel's layout): cached_packed_weight_cpu."""
        s = self.state
        # One buffer lookup (nn.Module attribute lookups of buffers cost ~0.5 us each).
        return cached_packed_weight_cpu(self._buffers["weight"], s["stride"], s["dilation"], s["x_zero"], s["x_max"],
                                        s["groups"])

    def extra_repr(self) -> str:
        s = self.state
        epilogue = "bn" + (" + residual" if s["residual"] else "") + (" + relu" if s["relu"] else "")
        return (f"{s['in_channels']}, {s['out_channels']}, kernel_size={tuple(s['kernel_size'])}, "
                f"stride={tuple(s['stride'])}, padding={tuple(s['padding'])}, "
                + (f"groups={s['groups']}, " if s["groups"] > 1 else "") + f"int8 conv + {epilogue}, "
                f"in scale={s['x_scale']:.3g} zp={s['x_zero']}, out scale={s['out_scale']:.3g} zp={s['out_zero']}"
                + (", 7-bit out" if s["out_max"] < 0 else ""))


class Int8MaxPool2d(nn.Module):
    """Max-pool on int8 codes: exact, and the output keeps the input's scale and zero point."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.kernel_size, self.stride, self.padding = pool.kernel_size, pool.stride, pool.padding
        self.dilation, self.ceil_mode = pool.dilation, pool.ceil_mode

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return int8_max_pool2d(q, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, int8"


class Int8ResidualBlock(nn.Module):
    """A ResNet BasicBlock/Bottleneck in int8: `last(body(x), residual=downsample(x) or x)`.

    forward(x: int8 (N, C, H, W)) -> int8 (N, K, OH, OW); the residual is added in the last
    conv's epilogue with its own scale.
    """

    def __init__(self, body: nn.Sequential, last: Int8Conv2d, downsample: Int8Conv2d | None):
        super().__init__()
        self.body, self.last, self.downsample = body, last, downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.last(self.body(x), identity)

    @property
    def output_qparams(self) -> QParams:
        return self.last.output_qparams


def in_own_dtype(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x in the dtype of `module`'s parameters (fp32/fp16/bf16; x's own if it has none): a float
    module inside an int8 model runs in its own dtype, whatever the caller's or a later cast."""
    for parameter in module.parameters():  # the first one (torch 2.6's Dynamo cannot trace next(it, default))
        return x.to(parameter.dtype)
    return x


class FloatFallback(nn.Module):
    """A module left in floating point inside an int8 model: dequantize, run it, quantize.

    forward(q: int8 (N, C, H, W)) -> int8; `reason` says why the module stayed float.
    """

    def __init__(self, module: nn.Module, in_q: QParams, out_q: QParams, reason: str):
        super().__init__()
        self.dequantize, self.module, self.quantize = DequantizeOutput(in_q), module, QuantizeInput(out_q)
        self.reason = reason

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.module(in_own_dtype(self.module, self.dequantize(q))))

    @property
    def output_qparams(self) -> QParams:
        return self.quantize.output_qparams

    def extra_repr(self) -> str:
        return f"float: {self.reason}"
