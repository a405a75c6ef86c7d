"""Each distinct ResNet-50 conv shape: tlcore's fused conv+BN+ReLU against cuDNN's conv alone."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import tlcore
from conftest import DEVICE, needs_gpu, run_benchmark

pytestmark = needs_gpu


@functools.cache
def conv_shapes(model_name="resnet50", groups=1):
    """(C, K, R, S, stride, padding, H, W) of every distinct conv with `groups` groups in a
    torchvision model at 224x224."""
    import torchvision

    shapes = []
    with torch.device("meta"):  # shapes only: no weights initialised, no arithmetic
        model = getattr(torchvision.models, model_name)().eval()

    def record(conv, args, _out):
        shape = (conv.in_channels, conv.out_channels, *conv.kernel_size, conv.stride[0], conv.padding[0],
                 *args[0].shape[2:])
        if conv.groups == groups and shape not in shapes:
            shapes.append(shape)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224, device="meta"))
    for h in hooks:
        h.remove()
    return shapes


SHAPES = conv_shapes("resnet50")


def shape_id(shape) -> str:
    """A conv_shapes entry as a test id, e.g. c64k64r3s3st1p1h56w56."""
    return "c{}k{}r{}s{}st{}p{}h{}w{}".format(*shape)


def make_layer(shape, batch, dtype=torch.float16):
    c, k, r, s, stride, padding, h, w = shape
    x = [torch.randn(batch, c, h, w, device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)
         for _ in range(2)]
    weight = (torch.randn(k, c, r, s, device=DEVICE) / math.sqrt(c * r * s)).to(dtype)
    weight = weight.contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(k, device=DEVICE) + 0.5, torch.randn(k, device=DEVICE)
    return x, weight, scale, shift, dict(stride=stride, padding=padding)


@pytest.mark.parametrize("batch", [32, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("variant", ["tlcore conv+bn+relu", "cudnn conv alone", "eager conv+bn+relu"])
def test_resnet50_layer(benchmark, variant, shape, batch):
    x, weight, scale, shift, conv = make_layer(shape, batch)
    scale16, shift16 = scale.half().view(1, -1, 1, 1), shift.half().view(1, -1, 1, 1)
    fns = {
        "tlcore conv+bn+relu": lambda t: tlcore.ops.conv2d_bn_relu(t, weight, scale, shift, **conv),
        "cudnn conv alone": lambda t: F.conv2d(t, weight, **conv),
        "eager conv+bn+relu": lambda t: torch.relu(F.conv2d(t, weight, **conv) * scale16 + shift16),
    }
    fn = fns[variant]
    ref = torch.relu(F.conv2d(x[0].float(), weight.float(), **conv) * scale.view(1, -1, 1, 1)
                     + shift.view(1, -1, 1, 1))
    if variant != "cudnn conv alone":
        out = fn(x[0]).float()
        assert ((out - ref).norm() / ref.norm()).item() < 2e-2
    c, k, r, s, _, _, _, _ = shape
    oh, ow = ref.shape[2:]
    flops = 2 * batch * oh * ow * k * c * r * s
    run_benchmark(benchmark, fn, x, flops=flops, variant=variant, shape=shape, batch=batch)
