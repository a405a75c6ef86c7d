"""`tlcore.quantize(model, calibration_data)`: post-training INT8 quantization of torchvision ResNets.

    qmodel = tlcore.quantize(model.eval(), calibration_batches)   # a progress bar while it calibrates
    logits = qmodel(x)                                            # int8 inside, fp32 logits out
    torch.save(qmodel.state_dict(), "r50-int8.pt")
    # deploy: rebuild the int8 structure (same skip=; any one batch x will do), then load the saved one
    q2 = tlcore.quantize(model.eval(), x)
    q2.load_state_dict(torch.load("r50-int8.pt", weights_only=True))

Steps: `tlcore.fuse` folds BatchNorm into each conv (FusedConv2dBNReLU); observers from
torch.ao.quantization record every activation the int8 model will hold (the input, each
conv output, each block output) while the calibration batches run through the fused
float model; each fused conv then becomes an Int8Conv2d (per-channel symmetric int8
weights, fixed-point requantization, the residual add and ReLU in its epilogue) and each
residual block an Int8ResidualBlock. Between layers activations stay int8 NHWC.

Coverage: the stem conv, the max-pool (on int8 codes) and every BasicBlock / Bottleneck
run in int8, ResNeXt's grouped 3x3 convs included (tlcore.fuse leaves those stock, as its
fp16 kernel has no groups; here they fold like the others). The average pool sums the int8
codes exactly and dequantizes the (N, C) means; the fc keeps its weights in int8 (per output
row) and its math in fp32 (Int8Linear): a batch-1 fc waits for its weights, and the fp32
features keep the logits' precision.
A block that cannot run in int8 (a conv stage fold_conv_stage does not cover) or that is
named in `skip` stays float between a dequantize and a quantize (FloatFallback, whose repr
says why); a stem that is not conv + BatchNorm (+ ReLU) stays float with its max-pool. quantize
warns of the float blocks and stem that skip did not name. Models other than torchvision ResNets raise.
"""
import copy
import math
import numbers
import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torch.ao.quantization import HistogramObserver, MinMaxObserver
from tqdm.auto import tqdm

from tlcore.backend import BACKENDS
from tlcore.fuse import fuse_chains, has_hooks, hook_dicts, require_eval
from tlcore.nn.blocks import FusedResidualBlock
from tlcore.nn.conv import FusedConv2dBNReLU, StockConv2d
from tlcore.nn.int8 import (DequantizeOutput, FloatFallback, Int8Conv2d, Int8GlobalAvgPool, Int8Linear,
                            Int8MaxPool2d, Int8ResidualBlock, QParams, QuantizeInput, _Int8Module, fold_conv_stage,
                            in_own_dtype)
from tlcore.ops.int8 import MAX_REDUCTION, QMAX, QMIN

METHODS = ("minmax", "percentile", "entropy", "mse")
SKIPPED = "skipped on request"  # the reason of a part left float because skip= names it
LAYERS = ("layer1", "layer2", "layer3", "layer4")
_OBSERVER_ARGS = dict(dtype=torch.qint8, qscheme=torch.per_tensor_affine, quant_min=QMIN, quant_max=QMAX)
# reduce_range: 128 codes. torch.ao's observers want a range holding 0, so they compute it as
# quint8 0..127 and _qparams moves it down to our -128..-1.
_SEVEN_BIT_ARGS = dict(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=127)


class PercentileObserver(HistogramObserver):
    """Clips the range to the [100 - p, p] percentiles of HistogramObserver's histogram."""

    def __init__(self, percentile: float, **kwargs):
        super().__init__(**kwargs)
        self.percentile = percentile

    @torch.jit.ignore
    def calculate_qparams(self):
        hist = self.histogram.to("cpu", torch.float64)  # (a CUDA model's observers keep it on the GPU)
        cdf = hist.cumsum(0) / hist.sum()
        tail = 1.0 - self.percentile / 100.0
        width = (self.max_val - self.min_val) / self.bins
        low = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64), right=True))
        high = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=torch.float64)))
        new_min = self.min_val + width * min(low, high)
        new_max = self.min_val + width * (min(high, self.bins - 1) + 1)
        return self._calculate_qparams(new_min, new_max)


class EntropyObserver(HistogramObserver):
    """Chooses the clipping threshold that minimises the KL divergence between the histogram and
    its 256-level quantization (the calibration of TensorRT, Migacz, "8-bit Inference with
    TensorRT", GTC 2017). It searches the upper threshold of non-negative tensors (post-ReLU,
    most of a ResNet); signed tensors use HistogramObserver's own L2 search.
    """

    @torch.jit.ignore
    def calculate_qparams(self):
        if self.min_val < 0:
            return super().calculate_qparams()
        hist = self.histogram.to("cpu", torch.float64, copy=True)  # (on the GPU for a CUDA model)
        hist[0] = 0  # the ReLU's exact zeros: the zero point holds them exactly whatever the threshold
        keep = _kl_threshold(hist, self.quant_max - self.quant_min + 1)
        width = (self.max_val - self.min_val) / self.bins
        return self._calculate_qparams(self.min_val, self.min_val + width * keep)


def _kl_threshold(hist: torch.Tensor, levels: int) -> int:
    """The number of leading bins to keep that minimises KL(P || Q) (outliers folded into the last bin)."""
    bins = hist.numel()
    if bins <= levels or hist.sum() == 0:
        return bins
    best, best_keep = math.inf, bins
    for keep in range(levels, bins + 1, max(1, (bins - levels) // 256)):
        p = hist[:keep].clone()
        p[-1] += hist[keep:].sum()
        level = torch.arange(keep) * levels // keep
        used = (hist[:keep] > 0).double()
        level_sum = torch.zeros(levels, dtype=torch.float64).index_add_(0, level, hist[:keep])
        level_used = torch.zeros(levels, dtype=torch.float64).index_add_(0, level, used)
        q = used * level_sum[level] / level_used[level].clamp_min(1)
        p, q = p / p.sum(), q / q.sum().clamp_min(1e-300)
        mask = p > 0
        kl = (p[mask] * torch.log(p[mask] / q[mask].clamp_min(1e-12))).sum().item()
        if kl < best:
            best, best_keep = kl, keep
    return best_keep


def _make_observer(method: str, percentile: float, reduce_range: bool) -> nn.Module:
    args = _SEVEN_BIT_ARGS if reduce_range else _OBSERVER_ARGS
    if method == "minmax":
        return MinMaxObserver(**args)
    if method == "mse":
        return HistogramObserver(**args)  # searches the range with the least L2 quantization error
    if method == "percentile":
        return PercentileObserver(percentile, **args)
    return EntropyObserver(**args)


DEFAULT_PERCENTILE = 99.99


def quantize(model: nn.Module, calibration_data, method: str = "minmax", percentile: float | None = None,
             skip=(), backend: str | None = None, reduce_range: bool = False, progress: bool = True,
             check_finite: bool = True) -> nn.Module:
    """An INT8 copy of a torchvision ResNet, calibrated on `calibration_data`.

    Args:
        model: a torchvision ResNet (BasicBlock or Bottleneck) in eval mode, on the device the
            int8 model should run on (CPU: the C++ kernels; CUDA: the Triton kernels).
        calibration_data: an iterable of input batches, (N, 3, H, W) float tensors or
            (inputs, labels) pairs such as a DataLoader's, or one (N, 3, H, W) batch; at least
            one non-empty batch, all finite and not all one value.
        method: how activation ranges are chosen: "minmax", "percentile" (clip to
            `percentile`, default 99.99), "entropy" (KL divergence) or "mse" (least L2 error).
        skip: names of blocks to keep in float ("layer1.0", ...), "conv1" for the stem, "fc" for
            the fc (then its weights stay fp32); one name or a collection of them (None: none).
        backend: force a tlcore backend for the int8 ops ("cpu", "triton", "cuda", "torch") where
            they have it, in eager mode (traced, TLCORE_BACKEND applies); all give the same codes.
            None: on GPUs each conv runs on the GPU kernel measured fastest for it (README, Backends).
        reduce_range: 7-bit activations between convs (codes -128..-1), like torch.ao's x86
            backend: half the resolution, but on AVX2 CPUs without VNNI the C++ kernel can then
            use vpmaddubsw exactly (about 1.4x faster there). Off: full 8 bits.
        progress: show a progress bar while calibrating.
        check_finite: raise ValueError on an input (or a float block's output) with NaN or inf. On
            GPUs the check waits for the GPU once a forward, which a CUDA graph (torch.cuda.graph,
            torch.compile(mode="reduce-overhead")) cannot capture: False skips it, and then NaN
            quantizes to the zero point and infinities saturate (finite, meaningless logits).

    Returns:
        The quantized model: float (N, 3, H, W) in, fp32 logits out. Its state_dict loads
        with weights_only=True into a model rebuilt by the same call. It runs none of the
        model's forward or backward hooks (they would see int8 codes; a warning names them).
    """
    _check_resnet(model)  # first: a wrapper left in train mode around an eval'd ResNet would get the wrong hint
    require_eval(model, "tlcore.quantize calibrates an inference model and folds BatchNorm")
    if method not in METHODS:
        raise ValueError(f"tlcore.quantize: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"tlcore.quantize: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if percentile is not None and method != "percentile":
        raise ValueError(f"tlcore.quantize: percentile= applies to method='percentile' only, got method={method!r}")
    percentile = DEFAULT_PERCENTILE if percentile is None else percentile
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real):
        raise TypeError(f"tlcore.quantize: percentile must be a number in (50, 100], got {percentile!r}")
    percentile = float(percentile)
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"tlcore.quantize: percentile must be in (50, 100], got {percentile}")
    for name, flag in (("reduce_range", reduce_range), ("progress", progress), ("check_finite", check_finite)):
        if not isinstance(flag, bool):
            raise TypeError(f"tlcore.quantize: {name} must be True or False, got {flag!r}")
    skip = _skip_names(skip)
    known = {"conv1", "fc"} | {f"{name}.{i}" for name in LAYERS for i in range(len(getattr(model, name)))}
    if skip - known:
        raise ValueError(f"tlcore.quantize: cannot skip {sorted(skip - known)}; skippable are 'conv1' (the stem), "
                         "the blocks 'layer1.0', ... and 'fc'")
    model = copy.deepcopy(model)
    _drop_hooks(model)
    fused = fuse_chains(model, inplace=True)
    folded = {m: f for m in fused.modules() if (f := fold_conv_stage(m)) is not None}  # the covered conv stages
    observers = _calibrate(fused, folded, calibration_data, method, percentile, progress, reduce_range)
    _check_ranges(fused, observers)
    stem_reason = _stem_float_reason(fused, skip)
    qmodel = _convert_resnet(fused, folded, observers, skip, stem_reason)
    _warn_of_float_parts(qmodel, stem_reason)
    for module in qmodel.modules():
        if isinstance(module, _Int8Module):
            module.backend = backend
        if isinstance(module, QuantizeInput):
            module.check_finite = check_finite
    return qmodel.eval()


def _stem_float_reason(fused: nn.Module, skip: set) -> str:
    """Why the fused ResNet's stem (conv1 and its max-pool) stays float ('' if it runs in int8)."""
    if "conv1" in skip:
        return SKIPPED
    stem = fused.conv1
    if not isinstance(stem, FusedConv2dBNReLU):  # (tlcore.fuse says why where it left the conv stock)
        reason = getattr(stem, "tlcore_reason", "")
        return f"the stem: {reason}" if reason else \
            f"the stem conv1 is a {type(stem).__name__}, not a Conv2d followed by a BatchNorm2d"
    if type(fused.maxpool) not in (nn.MaxPool2d, nn.Identity):  # (CIFAR-style ResNets have an Identity)
        return f"the stem's pool is {type(fused.maxpool).__name__}, not nn.MaxPool2d"
    return ""


def _warn_of_float_parts(qmodel: nn.Module, stem_reason: str) -> None:
    """Warn where the stem or blocks of the int8 model stay float without skip= asking for it: they
    run at float speed (a model whose BatchNorm was folded into its convs beforehand, say, would
    otherwise come back almost all float in silence)."""
    reasons = {"conv1": stem_reason} if stem_reason else {}
    reasons |= {name: m.reason for name, m in qmodel.named_modules() if isinstance(m, FloatFallback)}
    unrequested = {name: reason for name, reason in reasons.items() if reason != SKIPPED}
    if not unrequested:
        return
    why = "; ".join(sorted(set(unrequested.values())))
    blocks_unrequested = any(name != "conv1" for name in unrequested)
    if blocks_unrequested and not any(isinstance(module, Int8Conv2d) for module in qmodel.modules()):
        warnings.warn(f"tlcore.quantize: no conv could run in int8 ({why}): the model stays float, with int8 "
                      "activations between its blocks", stacklevel=3)
    else:
        verb = "stays" if len(unrequested) == 1 else "stay"
        warnings.warn(f"tlcore.quantize: {', '.join(unrequested)} {verb} float ({why}), with no int8 speed-up "
                      "(print(qmodel) shows each float block's reason)", stacklevel=3)


def _skip_names(skip) -> set[str]:
    """skip as a set of names: one name, a collection of them, or None."""
    if skip is None:
        return set()
    names = {skip} if isinstance(skip, str) else set(skip) if isinstance(skip, Iterable) else None
    if names is None or not all(isinstance(name, str) for name in names):
        raise TypeError(f"tlcore.quantize: skip must be a name ('layer1.0', 'conv1', 'fc') or a collection of "
                        f"names, got {skip!r}")
    return names


def _drop_hooks(model: nn.Module) -> None:
    """Remove the forward and backward hooks of model's modules (in place; model is quantize's copy),
    with a warning that names them: the int8 model's modules take and give int8 codes, so hooks
    written for the float tensors would misread them, and calibration should not call them."""
    hooked = [name or type(model).__name__ for name, module in model.named_modules() if has_hooks(module)]
    if not hooked:
        return
    for module in model.modules():
        for hooks in hook_dicts(module):
            hooks.clear()
    warnings.warn(f"tlcore.quantize: the int8 model does not keep the hooks on {hooked} (its modules pass int8 "
                  "codes, not the float tensors those hooks saw), nor did they run while it calibrated: register "
                  "hooks on the quantized model", stacklevel=3)


def _check_resnet(model: nn.Module) -> None:
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    except ImportError as error:
        raise ImportError("tlcore.quantize rewrites torchvision ResNets and needs torchvision") from error
    # A subclass is fine as long as it runs ResNet's own forward (the int8 model replaces its stages).
    if not (isinstance(model, ResNet) and type(model).forward is ResNet.forward
            and type(model)._forward_impl is ResNet._forward_impl):
        raise TypeError(f"tlcore.quantize supports torchvision ResNet models (BasicBlock/Bottleneck) with their "
                        f"own forward, got {type(model).__name__}: quantize the ResNet inside a wrapper "
                        "(nn.Sequential, DataParallel); other architectures are not covered by its int8 scheme")
    if any(isinstance(m, (FusedConv2dBNReLU, FusedResidualBlock)) for m in model.modules()):
        raise TypeError("tlcore.quantize takes the float model, not one from tlcore.fuse (its BatchNorms are folded "
                        "into fp16/bf16/fp32 kernels already): quantize the model you passed to tlcore.fuse")
    dtypes = {p.dtype for p in model.parameters()} - {torch.float32, torch.float16, torch.bfloat16}
    if dtypes:  # (its convs would all stay float, each with a warning)
        raise TypeError(f"tlcore.quantize takes fp32, fp16 or bf16 models, got parameters of "
                        f"{', '.join(sorted(map(str, dtypes)))}: cast the model first, e.g. model.float()")
    for name in LAYERS:
        layer = getattr(model, name)
        if not isinstance(layer, nn.Sequential):
            raise TypeError(f"tlcore.quantize: {name} must be an nn.Sequential of torchvision BasicBlocks or "
                            f"Bottlenecks (an empty one drops the stage), got {type(layer).__name__}")
        for i, block in enumerate(layer):
            if type(block) not in (BasicBlock, Bottleneck):
                raise TypeError(f"tlcore.quantize: {name}.{i} is a {type(block).__name__}, not a torchvision "
                                "BasicBlock or Bottleneck")


def _observed_modules(fused: nn.Module, folded: dict) -> list[nn.Module]:
    """The modules whose outputs the int8 model stores: each conv stage (the keys of `folded`),
    the max-pool, and the output of each block left float."""
    modules = list(folded) + [fused.maxpool]
    for name in LAYERS:
        modules += [block for block in getattr(fused, name) if not isinstance(block, FusedResidualBlock)]
    return modules


def _calibrate(fused: nn.Module, folded: dict, data, method: str, percentile: float, progress: bool,
               reduce_range: bool) -> dict:
    """Run the batches through the fused float model; returns {module or "input": observer}."""
    param = next(fused.parameters())
    device, dtype = param.device, param.dtype
    # the stem's first conv (the stem itself, or the first in a chain of modules)
    channels = next((m.in_channels for m in fused.conv1.modules() if hasattr(m, "in_channels")), None)
    observers = {"input": _make_observer(method, percentile, reduce_range).to(device)}

    def observe(key, tensor) -> None:  # returns None: a hook's return value would replace the tensor
        if not torch.isfinite(tensor).all():  # (before an observer's own, less clear, error)
            raise ValueError("tlcore.quantize: calibration produced non-finite activations (NaN or inf in the "
                             "calibration data or the model)")
        observers[key](tensor.detach().float())

    handles = [fused.register_forward_pre_hook(lambda _, args: observe("input", args[0]))]
    for module in _observed_modules(fused, folded):
        observers[module] = _make_observer(method, percentile, reduce_range).to(device)
        handles.append(module.register_forward_hook(lambda m, _, out: observe(m, out)))
    try:
        with torch.no_grad():
            for x in input_batches(data, "tlcore.quantize", "calibrating", progress):
                if channels is not None and x.shape[1] != channels:
                    raise ValueError(f"tlcore.quantize: a calibration batch has {x.shape[1]} channels, the model's "
                                     f"stem takes {channels}")
                fused(x.to(device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
    return observers


def input_batches(data, caller: str, activity: str, progress: bool):
    """The non-empty input batches of `data`, with a progress bar "{caller}: {activity}".

    data: one (N, C, H, W) float tensor, or an iterable of such tensors or of (inputs, labels) pairs
    (a DataLoader's). Raises TypeError or ValueError for other batches, ValueError if no batch is
    non-empty.
    """
    if isinstance(data, torch.Tensor):  # one batch (iterating it would give single images)
        data = [data]
    if not isinstance(data, Iterable):
        raise TypeError(f"{caller}: data must be a DataLoader, an iterable of batches or one batch tensor, got "
                        f"{type(data).__name__}")
    batches = 0
    for batch in tqdm(data, desc=f"{caller}: {activity}", unit="batch", disable=not progress):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{caller}: batches must be tensors or (inputs, labels) pairs, got {type(x).__name__}")
        if not x.is_floating_point() or x.dim() != 4:
            # e.g. raw uint8 images, or one (inputs, labels) pair passed as the data: a list of two batches
            raise (ValueError if x.is_floating_point() else TypeError)(
                f"{caller}: batches must be float (N, C, H, W) inputs, as the model takes them, got a {x.dtype} "
                f"tensor of shape {tuple(x.shape)} (pass a DataLoader, a list of batches or one batch tensor)")
        if x.numel() > 0:
            batches += 1
            yield x
    if batches == 0:
        raise ValueError(f"{caller}: the data yielded no non-empty batch; {activity} needs at least one input")


def _check_ranges(fused: nn.Module, observers: dict) -> None:
    """Refuse constant calibration inputs, warn of constant activations: an int8 range calibrated on
    one value holds nothing else (scale ~1e-7), so every other value would saturate."""
    def constant(observer) -> bool:
        return bool(observer.min_val == observer.max_val)

    if constant(observers["input"]):
        raise ValueError(f"tlcore.quantize: every calibration input value is {float(observers['input'].min_val)}: "
                         "calibrate on representative inputs (e.g. real images, preprocessed as the model takes them)")
    flat = [name for name, module in fused.named_modules() if module in observers and constant(observers[module])]
    if flat:
        warnings.warn(f"tlcore.quantize: the activations of {flat} held one value over the calibration data, so "
                      "their int8 ranges hold nothing else: calibrate on more representative inputs", stacklevel=3)


def _qparams(observer) -> QParams:
    """The observer's qparams in our int8 codes (its own range may start at 0, see _SEVEN_BIT_ARGS)."""
    scale, zero_point = observer.calculate_qparams()
    shift = QMIN - observer.quant_min
    return QParams(float(scale), int(zero_point) + shift, int(observer.quant_max) + shift)


def _float_reason(block: nn.Module, folded: dict) -> str:
    """Why a fused block cannot run in int8 ('' if it can); folded: the covered conv stages, folded."""
    stages = list(block.body) + [block.last] if isinstance(block, FusedResidualBlock) else []
    if isinstance(block, FusedResidualBlock) and block.downsample is not None:
        stages.append(block.downsample)
    folds = [folded.get(stage) for stage in stages]
    if not stages or any(f is None for f in folds):
        stock = [m for m in block.modules() if isinstance(m, StockConv2d)]
        detail = stock[0].tlcore_reason if stock else "its structure is not conv + BN (+ ReLU) stages"
        return f"not quantized: a stage is not conv + BatchNorm (+ ReLU) with zero padding ({detail})"
    for f in folds:
        reduction = f.weight[0].numel()
        if reduction > MAX_REDUCTION:
            return f"C*R*S = {reduction} exceeds the int32-exact limit {MAX_REDUCTION}"
    return ""


def _convert_block(block: FusedResidualBlock, folded: dict, in_q: QParams, q) -> Int8ResidualBlock:
    body, current = [], in_q
    for stage in block.body:
        body.append(Int8Conv2d.from_folded(folded[stage], current, q(stage)))
        current = q(stage)
    downsample, res_q = None, in_q
    if block.downsample is not None:
        downsample = Int8Conv2d.from_folded(folded[block.downsample], in_q, q(block.downsample))
        res_q = q(block.downsample)
    last = Int8Conv2d.from_folded(folded[block.last], current, q(block.last), res_q)
    return Int8ResidualBlock(nn.Sequential(*body), last, downsample)


def _convert_resnet(model: nn.Module, folded: dict, observers: dict, skip: set, stem_reason: str) -> nn.Module:
    """Swap the fused ResNet's modules for int8 ones, in place; ResNet.forward stays as it is.
    folded: {conv stage: FoldedConv} of the stages the int8 scheme covers; stem_reason: why the stem
    stays float ('' if it does not)."""
    q = lambda module: _qparams(observers[module])  # noqa: E731
    input_q = _qparams(observers["input"])._replace(qmax=QMAX)  # QuantizeInput uses all 8 bits
    stem = model.conv1
    if not stem_reason:
        current = q(stem)
        model.conv1 = nn.Sequential(QuantizeInput(input_q), Int8Conv2d.from_folded(folded[stem], input_q, current))
        # (CIFAR-style ResNets replace the max-pool with nn.Identity, which passes int8 codes as they are)
        if type(model.maxpool) is nn.MaxPool2d:
            model.maxpool = Int8MaxPool2d(model.maxpool)
    else:  # the stem stays float; activations become int8 after the max-pool
        current = q(model.maxpool)._replace(qmax=QMAX)
        model.maxpool = nn.Sequential(model.maxpool, QuantizeInput(current))
        model.conv1.register_forward_pre_hook(_input_in_own_dtype)
    for name in LAYERS:
        layer = getattr(model, name)
        for i, block in enumerate(layer):
            reason = SKIPPED if f"{name}.{i}" in skip else _float_reason(block, folded)
            out_q = q(block.last) if isinstance(block, FusedResidualBlock) else q(block)
            if reason:
                layer[i] = FloatFallback(block, current, out_q, reason)
                out_q = out_q._replace(qmax=QMAX)  # its QuantizeInput uses all 8 bits
            else:
                layer[i] = _convert_block(block, folded, current, q)
            current = out_q
    pool = model.avgpool
    if type(pool) is nn.AdaptiveAvgPool2d and pool.output_size in (1, (1, 1)):  # torchvision's
        model.avgpool = Int8GlobalAvgPool(current)
    else:
        model.avgpool = nn.Sequential(DequantizeOutput(current), pool)
    if type(model.fc) is nn.Linear and "fc" not in skip:
        model.fc = Int8Linear.from_float(model.fc)
    else:  # a float fc runs in fp32 whatever the model's dtype (and gives fp32 logits after a .half())
        model.fc = model.fc.float()
        model.fc.register_forward_pre_hook(_input_in_own_dtype)
        model.fc.register_forward_hook(_output_in_fp32)
    return model


# Forward hooks of the float stem or fc an int8 model may keep (hooks rather than wrappers keep
# the state_dict's keys): the int8 model takes fp32, fp16 or bf16 input and gives fp32 logits, also
# after a model.half() or .to(dtype), which casts those float modules (and not the int8 ones).
def _input_in_own_dtype(module: nn.Module, args: tuple) -> tuple:
    return (in_own_dtype(module, args[0]), *args[1:])


def _output_in_fp32(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.float()
