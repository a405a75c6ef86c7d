"""tlcore.fuse on torchvision ResNets and arbitrary models: same answers, explained structure."""
import copy
import gc
import io
import warnings
import weakref

import pytest
import torch
import torchvision
from torch import nn

import tlcore
from numerics import assert_close_to_stock
from tlcore.backend import use_backend
from tlcore.nn import FusedConv2dBNReLU, FusedResidualBlock, StockConv2d

ON_GPU = torch.cuda.is_available()
# Under the interpreter a model costs 10-40 s; these three cover BasicBlock, Bottleneck
# and grouped (stock) convs. The deeper and wider ones repeat the same layer kinds and
# run their fused graphs on the PyTorch backend here, and on the Triton kernels on a GPU.
INTERPRETED = {"resnet18": 2, "resnet50": 2, "resnext50_32x4d": 1}  # name: batch
ALL_RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
               "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d"]


def randomize_batchnorm(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so that folding mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                k = m.num_features
                m.running_mean.copy_(torch.randn(k, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(k, generator=g) + 0.5)
                m.weight.copy_(torch.rand(k, generator=g) + 0.5)
                m.bias.copy_(torch.randn(k, generator=g) * 0.1)
    return model


def resnet(name: str, device, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(getattr(torchvision.models, name)()).eval().to(device, dtype)


def check_model(model, fused, x, dtype, backend):
    with torch.no_grad():
        ref = _float64_copy(model)(x.double())
        stock = model(x)
        with use_backend(backend):
            out = fused(x)
    assert out.dtype == x.dtype and out.shape == stock.shape
    return assert_close_to_stock(out, stock, ref, dtype, what=type(model).__name__)


def _float64_copy(model):
    return copy.deepcopy(model).double()


@pytest.mark.parametrize("name", ALL_RESNETS)
def test_resnet_matches_stock_fp32(device, name):
    model = resnet(name, device)
    fused = tlcore.fuse(model)
    interpreted = ON_GPU or name in INTERPRETED
    batch = INTERPRETED.get(name, 2)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    check_model(model, fused, x, torch.float32, "triton" if interpreted else "torch")


def test_frozen_batchnorm_is_folded(device):
    """torchvision's FrozenBatchNorm2d (detection backbones' BN) folds as BatchNorm2d in eval does:
    the same fused model, bit for bit, as from the same statistics in BatchNorm2d, and close to the
    unfused FrozenBatchNorm2d model (its own eps and formula)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = resnet("resnet18", device)
    torch.manual_seed(0)
    frozen = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d).eval().to(device)
    frozen.load_state_dict(model.state_dict())
    fused, fused_frozen = tlcore.fuse(model), tlcore.fuse(frozen)
    assert sum(isinstance(m, FusedConv2dBNReLU) for m in fused_frozen.modules()) == 20  # every conv
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad(), use_backend("triton" if ON_GPU else "torch"):
        out = fused_frozen(x)
        assert torch.equal(out, fused(x))
        torch.testing.assert_close(out, frozen(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL_RESNETS)
def test_resnet_every_groups1_conv_is_fused(name):
    model = resnet(name, "cpu")
    fused = tlcore.fuse(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    fused_convs = [m for m in fused.modules() if isinstance(m, FusedConv2dBNReLU)]
    stock_convs = [m for m in fused.modules() if isinstance(m, StockConv2d)]
    assert len(fused_convs) == sum(c.groups == 1 for c in convs)
    assert len(stock_convs) == sum(c.groups != 1 for c in convs)
    blocks = [m for m in fused.modules() if isinstance(m, FusedResidualBlock)]
    assert len(blocks) == sum(len(getattr(model, f"layer{i}")) for i in range(1, 5))
    assert all(b.last.residual and b.last.relu for b in blocks)
    # the only BatchNorms left follow grouped convs
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == len(stock_convs)
    assert isinstance(fused, torchvision.models.ResNet)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_resnet18_low_precision(device, dtype):
    model = resnet("resnet18", device, dtype)
    x = torch.randn(1, 3, 32, 32, device=device, dtype=dtype)
    check_model(model, tlcore.fuse(model), x, dtype, "triton")


def test_inputs_in_any_memory_format(device):
    model = resnet("resnet18", device)
    fused = tlcore.fuse(model)
    base = torch.randn(1, 3, 32, 64, device=device)
    with torch.no_grad(), use_backend("triton"):
        expected = model(base[..., ::2])
        for x in (base[..., ::2], base[..., ::2].contiguous(), base[..., ::2].contiguous(memory_format=torch.channels_last)):
            torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4)


def test_original_model_untouched_unless_inplace():
    model = resnet("resnet18", "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = tlcore.fuse(model)
    assert fused is not model and isinstance(model.layer1[0].bn1, nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    same = tlcore.fuse(model, inplace=True)
    assert same is model and isinstance(model.layer1[0], FusedResidualBlock)


def test_print_explains_fused_and_stock_layers():
    text = repr(tlcore.fuse(resnet("resnext50_32x4d", "cpu")))
    assert "fused: conv + bn + residual + relu" in text
    assert "fused: conv + bn + relu" in text
    assert "fused: conv + bn)" in text  # downsample: no ReLU
    assert "left stock: groups=32: only groups=1 is fused" in text


def test_state_dict_round_trip_with_weights_only():
    x = torch.randn(2, 3, 32, 32)
    fused = tlcore.fuse(resnet("resnet18", "cpu"))
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)  # a differently initialised model of the same structure
    other = tlcore.fuse(randomize_batchnorm(torchvision.models.resnet18(), seed=7).eval())
    with torch.no_grad():
        assert not torch.equal(other(x), fused(x))
        other.load_state_dict(torch.load(buffer, weights_only=True))
        assert torch.equal(other(x), fused(x))


def test_train_mode_is_refused():
    model = resnet("resnet18", "cpu")
    with pytest.raises(ValueError, match="eval"):
        tlcore.fuse(model.train())
    fused = tlcore.fuse(model.eval())
    fused.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        fused(torch.randn(1, 3, 32, 32))


def test_swapped_activations_are_not_fused_as_relu():
    model = resnet("resnet18", "cpu")
    model.relu = nn.SiLU()
    model.layer1[0].relu = nn.LeakyReLU(0.1)
    fused = tlcore.fuse(model.eval())
    assert isinstance(fused.conv1, StockConv2d) and isinstance(fused.layer1[0], type(model.layer1[0]))
    assert isinstance(fused.layer1[1], FusedResidualBlock)
    assert "the activation is LeakyReLU, not ReLU" in repr(fused)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


def test_float64_model_stays_stock_with_reason():
    model = resnet("resnet18", "cpu", torch.float64)
    fused = tlcore.fuse(model)
    assert not any(isinstance(m, FusedConv2dBNReLU) for m in fused.modules())
    assert "left stock: dtype torch.float64 is not supported" in repr(fused)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))


# ---- arbitrary models through torch.fx ----------------------------------------------------------

class ConvNet(nn.Module):
    """Chains fx must find: Sequential conv-bn-relu, conv-bn-add-relu, conv(bias)-bn, 'same' padding."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv_a = nn.Conv2d(8, 8, 3, padding="same", bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(8, 6, 1, stride=2, bias=True)
        self.bn_b = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.bn_a(self.conv_a(x)) + x)
        x = self.bn_b(self.conv_b(x))
        return self.head(x.mean((2, 3)))


class DataDependent(nn.Module):
    """Python control flow on tensor values: does not trace with torch.fx."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


class SelfAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(y + y)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class ParentCallsInnerConv(nn.Module):
    """The parent calls the block's conv directly too: it must stay a plain conv."""

    def __init__(self):
        super().__init__()
        self.block = Inner()

    def forward(self, x):
        return self.block(x) + self.block.conv(x)


class InnerWithReluModule(Inner):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class ParentCallsInnerBN(nn.Module):
    """The parent calls the block's BatchNorm too: folding it away would break that call."""

    def __init__(self):
        super().__init__()
        self.block = Inner()

    def forward(self, x):
        return self.block(x) + self.block.bn(x.repeat(1, 2, 1, 1)[:, :4])


class ParentCallsInnerRelu(nn.Module):
    """The parent calls the block's ReLU module too: conv + BN fuse, the ReLU stays."""

    def __init__(self):
        super().__init__()
        self.block = InnerWithReluModule()

    def forward(self, x):
        return self.block(x) + self.block.act(-x).sum()


class ConvOutputUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


@pytest.mark.parametrize("cls,fused_convs,reason", [
    (SelfAdd, 1, None),
    (ParentCallsInnerConv, 0, "called from more than one place"),
    (ParentCallsInnerBN, 0, "its BatchNorm is also called from outside Inner"),
    (ParentCallsInnerRelu, 1, None),
    (ConvOutputUsedTwice, 0, "its output is used by more than the BatchNorm"),
])
def test_fx_edge_cases_keep_stock_semantics(cls, fused_convs, reason):
    model = _fx_model(cls)
    fused = tlcore.fuse(model)
    assert sum(isinstance(m, FusedConv2dBNReLU) for m in fused.modules()) == fused_convs
    if reason:
        assert reason in repr(fused)
    x = torch.randn(2, 3, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_batchnorm_in_train_mode_inside_eval_model_is_refused():
    model = _fx_model(Inner)
    model.bn.train()
    with pytest.raises(ValueError, match="'bn' is in train mode"):
        tlcore.fuse(model)


def _fx_model(cls):
    torch.manual_seed(0)
    return randomize_batchnorm(cls()).eval()


def test_fx_fuses_generic_chains(device):
    model = _fx_model(ConvNet).to(device)
    fused = tlcore.fuse(model)
    kinds = {name: m for name, m in fused.named_modules() if isinstance(m, FusedConv2dBNReLU)}
    assert set(kinds) == {"stem.0", "conv_a", "conv_b"}
    assert kinds["conv_a"].residual and kinds["conv_a"].relu and not kinds["conv_b"].relu
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 3, 11, 9, device=device)
    check_model(model, fused, x, torch.float32, "triton")


def test_untraceable_model_stays_stock_and_says_why():
    model = _fx_model(DataDependent)
    fused = tlcore.fuse(model)
    assert isinstance(fused.conv, StockConv2d) and "does not trace with torch.fx" in repr(fused)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))


def test_shared_conv_is_not_fused():
    model = _fx_model(SharedConv)
    fused = tlcore.fuse(model)
    assert not any(isinstance(m, FusedConv2dBNReLU) for m in fused.modules())
    assert "called from more than one place" in repr(fused)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))


# ---- compilation and export ---------------------------------------------------------------------

@pytest.mark.parametrize("strict", [False, True])  # (strict: torch.export's default before torch 2.7)
def test_export_keeps_the_custom_op(strict):
    fused = tlcore.fuse(resnet("resnet18", "cpu"))
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(fused, (x,), strict=strict)
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "tlcore.conv2d_bn_relu.default" in ops
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), fused(x))


def test_compile_traces_fullgraph():
    fused = tlcore.fuse(resnet("resnet18", "cpu"))
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), fused(x))


def test_autocast_region_gives_stock_dtypes():
    """Under torch.autocast a fused ResNeXt computes as stock does there: its stock grouped convs hand bf16 to
    the fused layers after them (a dtype error before the op cast under autocast), and its logits are bf16
    within 2x of stock's error; torch.compile traces the same."""
    model = resnet("resnext50_32x4d", "cpu")
    fused = tlcore.fuse(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = _float64_copy(model)(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16), use_backend("torch"):
            stock = model(x)
            out = fused(x)
            compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)(x)
    assert out.dtype == stock.dtype == torch.bfloat16
    assert_close_to_stock(out, stock, ref, torch.bfloat16, what="ResNeXt-50 under autocast")
    torch.testing.assert_close(compiled, out, rtol=0, atol=0)


def test_gradients_flow_through_fused_layers():
    """Fine-tuning around a fused backbone, compiled or not (no torch.no_grad: a compiled ResNeXt failed to
    trace its backward): the input's and the fc's gradients are stock's (its model in eval mode), within 2x
    of stock's own error against float64. ResNeXt's stock grouped convs between fused layers need them."""
    model = resnet("resnext50_32x4d", "cpu")
    fused = tlcore.fuse(model)
    x = torch.randn(2, 3, 32, 32)

    def input_and_fc_grads(m, call):
        m.zero_grad()
        leaf = x.to(next(m.parameters()).dtype).requires_grad_()
        call(leaf).square().sum().backward()
        return leaf.grad, m.fc.weight.grad

    model64 = _float64_copy(model)
    ref = input_and_fc_grads(model64, model64)
    stock = input_and_fc_grads(model, model)
    with use_backend("torch"):
        eager = input_and_fc_grads(fused, fused)
        compiled = input_and_fc_grads(fused, torch.compile(fused, backend="aot_eager", fullgraph=True))
    for got, what in ((eager, "eager"), (compiled, "compiled")):
        for g, g_stock, g_ref, name in zip(got, stock, ref, ("x", "fc.weight")):
            assert_close_to_stock(g, g_stock, g_ref, torch.float32, what=f"{what} {name}")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="torch.compile over Triton ops needs a GPU")
def test_compile_inductor_on_gpu():
    model = resnet("resnet50", "cuda", torch.float16)
    fused = tlcore.fuse(model)
    x = torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        ref = _float64_copy(model)(x.double())
        assert_close_to_stock(compiled(x), model(x), ref, torch.float16, what="compiled resnet50")


class ReusesResNetModules(nn.Module):
    """Calls its ResNet's stem ReLU, a block's BN and another block's ReLU on its own: fusing those
    away would change its output (or break it: a fused block has no relu)."""

    def __init__(self):
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=6)
        self.extra = nn.Linear(6, 6)

    def forward(self, x):
        other = self.net.layer4[1].bn2(self.net.layer4[0].relu(x[:, :1].repeat(1, 512, 1, 1)))
        return self.net.relu(self.extra(self.net(x))) + other.mean()


def test_stem_and_block_modules_called_elsewhere_are_kept():
    model = ReusesResNetModules().eval()
    fused = tlcore.fuse(model)
    assert type(fused.net.relu) is nn.ReLU and "its relu is also called from outside" in repr(fused.net.conv1)
    for i, name in ((0, "relu"), (1, "bn2")):
        assert type(fused.net.layer4[i]) is torchvision.models.resnet.BasicBlock
        assert f"its {name} is also called from outside" in repr(fused.net.layer4[i])
    assert isinstance(fused.net.layer3[1], FusedResidualBlock)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def test_hooks_on_fused_away_modules_are_reported():
    """A hook on a module the fusion removes (a block, the stem's BN) would silently stop firing."""
    model = resnet("resnet18", "cpu")
    model.layer4[1].register_forward_hook(lambda *args: None)
    model.bn1.register_forward_pre_hook(lambda *args: None)
    model.layer2.register_forward_hook(lambda *args: None)  # kept: the Sequential stays
    with pytest.warns(UserWarning, match=r"hooks on \['bn1', 'layer4.1'\] are gone"):
        tlcore.fuse(model)


# ---- what fusing must not change around the chains (an audit's cases) ---------------------------

class UntraceableParent(nn.Module):
    """A forward torch.fx cannot trace (a check on a value) that calls its block's conv on its own."""

    def __init__(self):
        super().__init__()
        self.block = Inner()

    def forward(self, x):
        if x.sum() > -1e9:
            x = x * 1.0
        return self.block(x) + self.block.conv(x)


class UntraceableWrapper(nn.Module):
    """Untraceable too, but its code reaches no module below its child: relu here is torch's."""

    def __init__(self):
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=6)

    def forward(self, x):
        if x.shape[-1] > 8:
            x = x * 1.0
        return torch.relu(self.net(x))


def test_modules_an_untraceable_forward_reaches_stay_stock():
    model = _fx_model(UntraceableParent)
    fused = tlcore.fuse(model)
    assert isinstance(fused.block.conv, StockConv2d) and "called from more than one place" in repr(fused)
    x = torch.randn(2, 3, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    wrapper = tlcore.fuse(_fx_model(UntraceableWrapper))
    assert sum(isinstance(m, FusedConv2dBNReLU) for m in wrapper.modules()) == 20


class PreActivation(nn.Module):
    """An in-place ReLU writes the conv's input after the conv has read it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn(self.conv(x))
        shortcut = self.relu(x)
        return self.relu(out + shortcut)


class OptionalScale(nn.Module):
    """torch.fx would trace `scale is None` as False: the forward's default path differs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, scale=None):
        y = torch.relu(self.bn(self.conv(x)))
        return y if scale is None else y * scale


class ReusedHookedRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.act(self.conv2(self.act(self.bn(self.conv(x)))))


def test_in_place_writes_and_optional_arguments_keep_stock_semantics():
    for cls, channels in ((PreActivation, 4), (OptionalScale, 3)):
        model = _fx_model(cls)
        fused = tlcore.fuse(model)
        x = torch.randn(2, channels, 7, 6)
        with torch.no_grad():
            torch.testing.assert_close(fused(x.clone()), model(x.clone()), rtol=1e-5, atol=1e-5)
    assert "optional arguments" in repr(fused.conv)


def test_a_hooked_relu_called_twice_keeps_both_calls():
    model = _fx_model(ReusedHookedRelu)
    calls = []
    model.act.register_forward_hook(lambda *args: calls.append(1))
    fused = tlcore.fuse(model)
    with torch.no_grad():
        fused(torch.randn(1, 3, 6, 6))
    assert len(calls) == 2 and isinstance(fused.conv, FusedConv2dBNReLU)


class BlockWithAttributes(nn.Module):
    """A residual block with a plain attribute and a method that callers use: an fx.GraphModule
    would drop both, so it is fused in place, without its residual add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.scale = 0.5

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) + x)

    def scaled(self, x):
        return self(x) * self.scale


def test_fused_modules_keep_their_class_attributes_and_indices():
    model = _fx_model(BlockWithAttributes)
    fused = tlcore.fuse(model)
    assert type(fused) is BlockWithAttributes and isinstance(fused.conv, FusedConv2dBNReLU)
    x = torch.randn(2, 4, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused.scaled(x), model.scaled(x), rtol=1e-5, atol=1e-5)
    features = randomize_batchnorm(torchvision.models.vgg11_bn().features[:8]).eval()  # VGG's features: a Sequential
    fused = tlcore.fuse(features)
    assert type(fused) is nn.Sequential and len(fused) == len(features)
    assert [type(m) for m in fused[:3]] == [FusedConv2dBNReLU, nn.Identity, nn.Identity]
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        for depth in (3, 8):  # perceptual losses cut the Sequential at a ReLU
            torch.testing.assert_close(fused[:depth](x), features[:depth](x), rtol=1e-4, atol=1e-5)


class StockNormsAround(nn.Module):
    """Normalization layers with running statistics ahead of a fusable chain, a BatchNorm that stays
    stock behind it (its conv pads by reflection) and a head with its own BatchNorm."""

    def __init__(self):
        super().__init__()
        self.in0 = nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
        self.bn0 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8))

    def forward(self, x):
        return self.head(self.bn2(self.reflect(self.bn(self.conv(self.bn0(self.in0(x)))))))


def _running_means(model):
    return {name: m.running_mean.clone() for name, m in model.named_modules() if hasattr(m, "running_mean")}


def test_a_refused_train_mode_call_changes_no_statistics():
    fused = tlcore.fuse(_fx_model(StockNormsAround))
    before = _running_means(fused)
    assert set(before) == {"in0", "bn0", "bn2", "head.2"}  # (the stock ones)
    fused.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        fused(torch.randn(2, 3, 6, 6))
    assert all(torch.equal(mean, before[name]) for name, mean in _running_means(fused).items())


def test_stock_norms_train_while_the_fused_modules_are_frozen():
    """A frozen fused backbone under a head in train mode (or model.train() and the backbone's modules
    then eval()): the stock BatchNorms run as stock ones do."""
    model = _fx_model(StockNormsAround)
    fused = tlcore.fuse(model)
    fused.head.train()
    model.head.train()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.head[2].running_mean, model.head[2].running_mean)


def test_fusing_a_fused_model_again_keeps_one_refusal_and_warns_of_nothing():
    fused = tlcore.fuse(_fx_model(StockNormsAround))
    fused.reflect = nn.Conv2d(4, 4, 3, padding=1).eval()  # now bn2 can fold into it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = tlcore.fuse(fused)
    norms = [m for m in again.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    assert len(norms) == 3 and all(len(m._forward_pre_hooks) == 1 for m in norms)
    again.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        again(torch.randn(2, 3, 6, 6))


def _refusal_targets(norm):
    (hook,) = norm._forward_pre_hooks.values()
    return hook.fused_modules()


def test_copies_keep_the_refusal_and_parts_do_not_keep_the_backbone():
    """Copies and pickles of a fused model refuse train mode with their own fused modules; a head copied
    alone does not keep a copy of the fused modules, and a fused module the user replaces is freed."""
    fused = tlcore.fuse(_fx_model(StockNormsAround))
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(fused), torch.load(buffer, weights_only=False)):
        assert _refusal_targets(copied.head[2]) == [copied.conv]
        before = _running_means(copied)
        copied.train()
        with pytest.raises(RuntimeError, match="inference-only"):
            copied(torch.randn(2, 3, 6, 6))
        assert all(torch.equal(mean, before[name]) for name, mean in _running_means(copied).items())
    head = copy.deepcopy(fused.head)
    gc.collect()
    assert _refusal_targets(head[2]) == []
    replaced = weakref.ref(fused.conv)
    fused.conv = nn.Conv2d(3, 4, 3).eval()
    gc.collect()
    assert replaced() is None


def test_strict_export_of_a_model_with_stock_norms():
    fused = tlcore.fuse(_fx_model(StockNormsAround))
    x = torch.randn(2, 3, 6, 6)
    exported = torch.export.export(fused, (x,), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), fused(x))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.body(x)

    def norm(self, x):
        return self.body[1](x)


class ReachesInByIndex(nn.Module):
    """A forward torch.fx does not follow (optional argument) that reaches below its child by index,
    through the child's own method, or through an alias."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = ConvBN(), ConvBN(), ConvBN()

    def forward(me, x, y=None):
        norm = me.c.norm
        return me.a.body[1](me.a(x)) + me.b.norm(me.b(x)) + norm(me.c(x))


def test_modules_reached_by_index_method_or_hook_stay_stock():
    model = _fx_model(ReachesInByIndex)
    fused = tlcore.fuse(model)
    assert not any(isinstance(m, FusedConv2dBNReLU) for m in fused.modules())
    hooked = _fx_model(ConvBN)
    hooked.register_forward_hook(lambda module, args, out: module.body[1](out))
    assert not any(isinstance(m, FusedConv2dBNReLU) for m in tlcore.fuse(hooked).modules())
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))
