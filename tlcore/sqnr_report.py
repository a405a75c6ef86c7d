"""`tlcore.sqnr_report(model, qmodel, data)`: where an int8 model loses accuracy, block by block.

    report = tlcore.sqnr_report(model, qmodel, batches)   # {"conv1": 38.2, "layer1.0": 35.9, ..., "fc": 31.0}

Each value is the signal-to-quantization-noise ratio 20 log10(‖ref‖ / ‖ref − out‖) in dB of one
activation of the int8 model (dequantized) against the same activation of the float model, both
run end to end on the same inputs, so errors accumulate with depth: a block whose SQNR drops well
below its predecessor's is the one to keep float (`tlcore.quantize(..., skip=(name,))`). The names
are those `skip` takes: "conv1" (the stem's output after the max-pool), the blocks and "fc" (the logits).
"""
import math

import torch
from torch import nn

from tlcore.nn.int8 import Int8Conv2d, Int8Linear, QParams
from tlcore.ops.int8_layers import dequantize_per_tensor
from tlcore.quantize import LAYERS, input_batches


def sqnr_report(model: nn.Module, qmodel: nn.Module, data, progress: bool = True) -> dict[str, float]:
    """Per-stage SQNR in dB of `qmodel` (from `tlcore.quantize(model, ...)`) against `model`.

    Args:
        model: the float torchvision ResNet that was quantized, in eval mode.
        qmodel: its int8 model, on the same device.
        data: input batches in any form `tlcore.quantize` takes: one (N, 3, H, W) tensor, or an
            iterable of them or of (inputs, labels) pairs. Noise and signal energies are summed
            over all batches before the ratio is taken.
        progress: show a progress bar.

    Returns:
        {"conv1": dB, "layer1.0": dB, ..., "fc": dB} in the model's order; inf where the two agree exactly.
    """
    parts = ("conv1", "maxpool", *LAYERS)
    for name, module in (("model", model), ("qmodel", qmodel)):
        if not isinstance(module, nn.Module) or not all(hasattr(module, part) for part in parts):
            raise TypeError(f"tlcore.sqnr_report: {name} must be a torchvision ResNet (or its tlcore.quantize "
                            f"model), not a wrapper around one; got {type(module).__name__}")
    if model.training or qmodel.training:
        raise ValueError("tlcore.sqnr_report compares inference models: call .eval() on both")
    if any(isinstance(m, Int8Conv2d) for m in model.modules()) or next(model.parameters(), None) is None:
        raise ValueError("tlcore.sqnr_report: `model` must be the float model qmodel was quantized from")
    float_points, int8_points = _float_points(model), _int8_points(qmodel)
    if list(float_points) != list(int8_points):
        raise ValueError(f"tlcore.sqnr_report: model has the stages {list(float_points)[1:-1]} and qmodel "
                         f"{list(int8_points)[1:-1]}; pass the model qmodel was quantized from")
    _check_same_fc(model, qmodel)
    signal = dict.fromkeys(float_points, 0.0)
    noise = dict.fromkeys(float_points, 0.0)
    param = next(model.parameters())
    int8_modules = {name: module for name, (module, _) in int8_points.items()}
    with torch.no_grad():
        for x in input_batches(data, "tlcore.sqnr_report", "comparing", progress):
            x = x.to(param.device, param.dtype)  # both models take the float model's dtype, as in calibration
            refs = _run_capturing(model, x, float_points)
            outs = _run_capturing(qmodel, x, int8_modules)
            for name, (_, q) in int8_points.items():
                out = outs[name] if q is None else dequantize_per_tensor(outs[name], q.scale, q.zero_point)
                ref, out = refs[name].double(), out.double()
                signal[name] += ref.square().sum().item()
                noise[name] += (ref - out).square().sum().item()
    return {name: _decibels(signal[name], noise[name]) for name in float_points}


def _check_same_fc(model: nn.Module, qmodel: nn.Module) -> None:
    """Refuse a float model of the right architecture that qmodel was not quantized from (e.g. another
    training run of it): the report would measure how the two models differ, not the quantization.
    Its fc weights (K, C) must be those qmodel holds: per-row int8 codes are ~40 dB from the float
    weights they came from, another model's ~0 dB."""
    weight, held = getattr(model.fc, "weight", None), getattr(qmodel.fc, "weight", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(held, torch.Tensor):
        return  # a custom head, kept float as it is
    held = held.detach().double()
    if isinstance(qmodel.fc, Int8Linear):
        held = held * qmodel.fc.w_scale.double()[:, None]
    weight = weight.detach().double().to(held.device)
    if held.shape != weight.shape or _decibels(weight.square().sum().item(), (weight - held).square().sum().item()) < 20:
        raise ValueError("tlcore.sqnr_report: model's fc weights are not those qmodel holds; pass the float model "
                         "qmodel was quantized from")


def _decibels(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def _float_points(model: nn.Module) -> dict[str, nn.Module]:
    """{name: the float model's module whose output is compared}; "fc" is the whole model."""
    points = {"conv1": model.maxpool}
    points.update({f"{layer}.{i}": block for layer in LAYERS for i, block in enumerate(getattr(model, layer))})
    points["fc"] = model
    return points


def _int8_points(qmodel: nn.Module) -> dict[str, tuple[nn.Module, QParams | None]]:
    """{name: (the int8 model's module whose output is compared, the quantization of its codes)};
    "fc" is the whole model, whose logits are float."""
    # The stem's codes leave the max-pool with the stem conv's quantization (Int8MaxPool2d keeps
    # it) or, when the stem stayed float, with that of the QuantizeInput after the pool.
    stem, pool = qmodel.conv1, qmodel.maxpool
    stem_out = pool[-1] if isinstance(pool, nn.Sequential) else stem[-1] if isinstance(stem, nn.Sequential) else stem
    points = {"conv1": (pool, _output_qparams(stem_out, "the stem"))}
    for layer in LAYERS:
        for i, block in enumerate(getattr(qmodel, layer)):
            points[f"{layer}.{i}"] = (block, _output_qparams(block, f"{layer}.{i}"))
    points["fc"] = (qmodel, None)
    return points


def _output_qparams(module: nn.Module, name: str) -> QParams:
    qparams = getattr(module, "output_qparams", None)  # the int8 modules that produce codes have it
    if qparams is None:
        raise TypeError(f"tlcore.sqnr_report: {name} of qmodel is a {type(module).__name__}, not int8; "
                        "pass the model tlcore.quantize returned")
    return qparams


def _run_capturing(model: nn.Module, x: torch.Tensor, points: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Run `model(x)` and return the outputs of the `points` modules."""
    outputs = {}
    handles = [module.register_forward_hook(lambda _, __, y, name=name: outputs.__setitem__(name, y))
               for name, module in points.items()]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs
