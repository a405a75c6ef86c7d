"""tlcore.ops.int8_conv2d: every backend bit-exact against the integer reference (the ops around it:
test_int8_layers.py)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from markers import needs_extension
from numerics import opcheck_utils
from tlcore import _extension
from tlcore.backend import use_backend
from tlcore.ops import int8 as q8, int8_cpu, weight_derived
from tlcore.ops.int8_cpu import (ALGORITHM_ENV, CPU_ALGORITHMS, CPU_ISA_ENV, CPU_ISAS, WINOGRAD_2X4_MAX_CHANNELS,
                                WINOGRAD_4X4_MAX_CHANNELS, cpu_algorithm, cpu_isa_for, cpu_isa_supported)

TESTED_ISAS = ["scalar", "avx2", "avxvnni", "avx512vnni", "amx"]  # avx2u7 needs 7-bit inputs: its own tests


def int64_conv(x, x_zero, weight, stride, padding, dilation, groups=1):
    """acc (N, K, OH, OW) int64 by unfolding windows and summing products in int64: no float anywhere."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    k, c, r, s = weight.shape
    xp = F.pad(x.to(torch.int64), (pw, pw, ph, ph), value=x_zero)
    windows = xp.unfold(2, dh * (r - 1) + 1, sh).unfold(3, dw * (s - 1) + 1, sw)[..., ::dh, ::dw]
    windows = windows.unflatten(1, (groups, c))  # (N, G, C / G, OH, OW, R, S)
    acc = torch.einsum("ngchwrs,gkcrs->ngkhw", windows, weight.to(torch.int64).unflatten(0, (groups, k // groups)))
    return acc.flatten(1, 2)


def make_case(n, c, h, w, k, r, s, stride=1, padding=0, dilation=1, residual=True, relu=True, seed=0,
              x_zero=None, layout="channels_last", groups=1):
    """Random int8 operands and the fixed point of plausible scales (outputs span the int8 range)."""
    g = torch.Generator().manual_seed(seed)
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    x = torch.randint(-128, 128, (n, c, h, w), generator=g, dtype=torch.int8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randint(-128, 128, (n, 2 * c, h, 2 * w), generator=g, dtype=torch.int8)[:, ::2, :, ::2]
    weight = torch.randint(-127, 128, (k, c // groups, r, s), generator=g, dtype=torch.int8)
    if x_zero is None:
        x_zero = int(torch.randint(-128, 128, (), generator=g))
    w_scale = torch.rand(k, generator=g) * 0.01 + 1e-3
    bias = torch.randn(k, generator=g)
    x_scale = 0.02
    # Output scale ~ the accumulator's spread, so results are neither all saturated nor all zero.
    out_scale = x_scale * w_scale.mean().item() * 74 * (c // groups * r * s * (74**2 + x_zero**2)) ** 0.5 / 40
    oh = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    res = torch.randint(-128, 128, (n, k, oh, ow), generator=g, dtype=torch.int8) if residual else None
    multiplier, offset, shift, res_multiplier = q8.requantization(
        x_scale, x_zero, weight, w_scale, bias, out_scale, -7, 0.2 * out_scale if residual else None, 11)
    case = dict(x=x, x_zero=x_zero, weight=weight, multiplier=multiplier, offset=offset, shift=shift,
                residual=res, res_multiplier=res_multiplier, out_zero=-7, relu=relu,
                stride=stride, padding=padding, dilation=dilation, out_max=127, x_max=127)
    return case if groups == 1 else dict(case, groups=groups)


def reference(case):
    acc = int64_conv(case["x"], case["x_zero"], case["weight"], case["stride"], case["padding"], case["dilation"],
                     case.get("groups", 1))
    return q8.requantize_reference(acc, case["multiplier"], case["offset"], case["shift"], case["residual"],
                                   case["res_multiplier"], case["out_zero"], case["relu"], case["out_max"])


def on_device(case, device):
    """case with its tensors moved to device."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def run(case, backend_name):
    kwargs = {k: v for k, v in case.items() if k not in ("x", "x_zero", "weight", "multiplier", "offset", "shift")}
    with use_backend(backend_name):
        return q8.int8_conv2d(case["x"], case["x_zero"], case["weight"], case["multiplier"], case["offset"],
                              case["shift"], **kwargs)


def assert_bit_exact(out, ref, what):
    assert out.dtype == torch.int8 and out.shape == ref.shape, f"{what}: {out.dtype} {tuple(out.shape)}"
    assert out.is_contiguous(memory_format=torch.channels_last), what
    wrong = (out != ref).sum().item()
    assert wrong == 0, f"{what}: {wrong} of {ref.numel()} outputs differ from the integer reference"
    # The case must exercise the epilogue: several distinct codes, not only saturation.
    assert ref.unique().numel() > min(20, ref.numel() // 4), f"{what}: degenerate case"


CASES = [  # n, c, h, w, k, r, s, stride, padding, dilation
    (1, 3, 17, 19, 16, 7, 7, 2, 3, 1),     # ResNet stem family, odd spatial sizes
    (2, 16, 9, 9, 24, 3, 3, 1, 1, 1),
    (1, 33, 7, 5, 17, 1, 1, 1, 0, 1),      # 1x1, odd channel counts
    (3, 8, 10, 10, 40, 1, 1, 2, 0, 1),     # strided 1x1 (downsample)
    (2, 13, 11, 13, 21, 3, 3, 2, 1, 1),    # strided 3x3, odd channels
    (1, 5, 12, 12, 7, 3, 3, 1, 2, 2),      # dilation
    (2, 6, 9, 14, 10, 1, 3, (1, 2), (0, 1), 1),  # asymmetric kernel and stride
    (1, 512, 5, 5, 19, 3, 3, 1, 1, 1),     # K = 3*3*512 = 4608, the deepest ResNet reduction
    (1, 3, 7, 9, 48, 3, 3, 1, 1, 1),       # avx512vnni: C <= 4; a 32-channel tile and a 16-channel tail, 63 rows
    (2, 12, 5, 7, 64, 1, 1, 1, 0, 1),      # avx512vnni: two full 32-channel tiles
]
CASE_IDS = ["x".join(map(str, c[:7])) for c in CASES]


@pytest.fixture
def two_threads():
    """Two intra-op threads, whatever the machine's cores: the task orders some tests pin depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def isa_or_skip(isa):
    if not cpu_isa_supported(isa):
        pytest.skip(f"this CPU has no {isa}")
    return isa


# ---- the reference itself -------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES[:3] + CASES[5:], ids=CASE_IDS[:3] + CASE_IDS[5:])
def test_float64_accumulation_is_exact(case):
    """The torch backend's float64 conv equals the int64 unfold + einsum (so it is an integer reference)."""
    c = make_case(*case)
    acc = int64_conv(c["x"], c["x_zero"], c["weight"], c["stride"], c["padding"], c["dilation"])
    ph, pw = c["padding"]
    xp = F.pad(c["x"].double(), (pw, pw, ph, ph), value=float(c["x_zero"]))
    acc64 = F.conv2d(xp, c["weight"].double(), stride=c["stride"], dilation=c["dilation"])
    assert torch.equal(acc64.to(torch.int64), acc)


def test_extreme_accumulation_is_exact():
    """All-(-128) inputs times all-(-127) weights over 4608 taps: the int32 accumulator's largest value."""
    x = torch.full((1, 512, 3, 3), -128, dtype=torch.int8)
    w = torch.full((2, 512, 3, 3), -127, dtype=torch.int8)
    acc = int64_conv(x, 0, w, [1, 1], [0, 0], [1, 1])
    assert acc.flatten().tolist() == [128 * 127 * 4608] * 2 and acc.max() < 2**31


def test_requantization_matches_float_math():
    """The fixed-point result is the float requantization rounded: within one code of the float64 value."""
    c = make_case(2, 24, 9, 9, 16, 3, 3, padding=1, residual=True, relu=False, x_zero=-3)
    g = torch.Generator().manual_seed(1)
    x_scale, w_scale, bias = 0.02, torch.rand(16, generator=g) * 0.01 + 1e-3, torch.randn(16, generator=g)
    out_scale, out_zero, res_scale, res_zero = 0.37, 4, 0.21, -9
    multiplier, offset, shift, res_multiplier = q8.requantization(
        x_scale, -3, c["weight"], w_scale, bias, out_scale, out_zero, res_scale, res_zero)
    acc = int64_conv(c["x"], -3, c["weight"], [1, 1], [1, 1], [1, 1])
    out = q8.requantize_reference(acc, multiplier, offset, shift, c["residual"], res_multiplier, out_zero, False)
    x_real = x_scale * (c["x"].double() + 3)
    w_real = w_scale.double().view(-1, 1, 1, 1) * c["weight"].double()
    y = F.conv2d(x_real, w_real, bias.double(), padding=1) + res_scale * (c["residual"].double() - res_zero)
    expected = (y / out_scale + out_zero).clamp(-128, 127)
    assert (out.double() - expected).abs().max() <= 0.5 + 1e-6
    assert 40 < out.unique().numel()


def test_requantization_reduces_shift_for_int64_headroom():
    weight = torch.full((2, 512, 3, 3), 127, dtype=torch.int8)
    multiplier, offset, shift, _ = q8.requantization(1e-3, -128, weight, torch.tensor([1e-9, 1e-9]), None, 1.0, 0)
    worst = 128 * 127 * 4608 * multiplier.abs().max().item() + offset.abs().max().item()
    assert 0 < shift <= q8.MAX_SHIFT and worst < 2**62


@pytest.mark.parametrize("fraction", [0.985, 0.995, 0.999])
def test_requantization_constants_pass_every_backends_headroom_check(fraction):
    """A bias that puts the offset near 2**62 at the usual shift: requantization lowers the shift
    by the kernels' own bound, so no backend refuses its constants (their bounds once differed)."""
    weight = torch.ones(2, 1, 1, 1, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    w_scale = torch.full((2,), 1e-3)
    shift = q8.requantization(0.01, 0, weight, w_scale, torch.zeros(2), 0.01, 0)[2]
    bias = torch.full((2,), fraction * 2.0**62 / 2**shift * 0.01)
    multiplier, offset, shift, _ = q8.requantization(0.01, 0, weight, w_scale, bias, 0.01, 0)
    x = torch.randint(-128, 128, (1, 1, 4, 4), dtype=torch.int8)
    for name in ("torch",) + (("cpu",) if _extension.loaded() else ()):
        with use_backend(name):
            out = q8.int8_conv2d(x, 0, weight, multiplier, offset, shift)
        assert torch.equal(out, torch.full_like(out, 127)), name  # the huge bias saturates every output


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_extension)])
def test_requantization_of_a_huge_bias(backend):
    """A bias whose int64 offset would overflow at the usual shift gets a smaller one (it used to wrap
    silently: saturated offsets, mixed -128/127 codes); a non-finite bias is refused."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randint(-127, 128, (4, 3, 3, 3), generator=g, dtype=torch.int8).contiguous(
        memory_format=torch.channels_last)
    x = torch.randint(-128, 128, (1, 3, 5, 5), generator=g, dtype=torch.int8).contiguous(
        memory_format=torch.channels_last)
    bias = torch.tensor([1e12, -1e12, 1e12, -1e12])
    multiplier, offset, shift, _ = q8.requantization(0.02, -128, weight, torch.full((4,), 1e-2), bias, 1e-3, -128)
    with use_backend(backend):
        out = q8.int8_conv2d(x, -128, weight, multiplier, offset, shift, padding=1)
    assert torch.equal(out[:, 0::2], torch.full_like(out[:, 0::2], 127))
    assert torch.equal(out[:, 1::2], torch.full_like(out[:, 1::2], -128))
    with pytest.raises(ValueError, match="finite"):
        q8.requantization(0.02, -128, weight, torch.full((4,), 1e-2), torch.full((4,), float("nan")), 1e-3, -128)


# ---- backends against the reference ---------------------------------------------------------

@needs_extension
@pytest.mark.parametrize("isa", TESTED_ISAS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_kernel_bit_exact(case, isa, monkeypatch):
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
    for residual, relu in ((True, True), (False, False)):
        c = make_case(*case, residual=residual, relu=relu)
        assert_bit_exact(run(c, "cpu"), reference(c), f"cpu/{isa} {case} residual={residual} relu={relu}")


@needs_extension
@pytest.mark.parametrize("isa", TESTED_ISAS)
@pytest.mark.parametrize("out_zero, out_max", [(-128, 127), (-127, 127), (-128, 126), (-127, 126)])
def test_cpu_epilogue_clamps_at_the_edges(out_zero, out_max, isa, monkeypatch):
    """The saturating packs already clamp to [-128, 127]; ReLU's floor (out_zero) and out_max clamp where
    they are tighter, by one code too. A 1x1 conv (the split algorithm on AVX2) and a 3x3 one (Winograd),
    with K = 36: two whole channel blocks and a partial one; outputs 4x as spread as make_case's."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
    for shape, padding in (((2, 40, 7, 9, 36, 1, 1), 0), ((1, 24, 9, 9, 36, 3, 3), 1)):
        c = make_case(*shape, padding=padding, residual=True, relu=True)
        c = dict(c, shift=c["shift"] - 2, out_zero=out_zero, out_max=out_max)
        ref = reference(c)
        assert ref[:, :32].min() == out_zero and ref[:, :32].max() == out_max  # both bind in the vector blocks
        assert_bit_exact(run(c, "cpu"), ref, f"cpu/{isa} {shape} out_zero={out_zero} out_max={out_max}")


@needs_extension
@pytest.mark.parametrize("isa", ["scalar", "avx2"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_cpu_kernel_any_input_layout(isa, layout, monkeypatch):
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
    c = make_case(2, 11, 8, 7, 9, 3, 3, padding=1, layout=layout)
    assert_bit_exact(run(c, "cpu"), reference(c), f"cpu/{isa} {layout}")


def seven_bit(case):
    """The case with 7-bit activations (reduce_range): codes and zero points in [-128, -1], out_max = -1."""
    g = torch.Generator().manual_seed(3)
    c = dict(case, out_max=-1, x_max=-1, x_zero=-100, out_zero=-90)
    c["x"] = torch.randint(-128, 0, case["x"].shape, generator=g, dtype=torch.int8).contiguous(
        memory_format=torch.channels_last)
    k = case["weight"].shape[0]
    w_scale, bias = torch.rand(k, generator=g) * 0.01 + 1e-3, torch.randn(k, generator=g)
    acc = int64_conv(c["x"], -100, case["weight"], case["stride"], case["padding"], case["dilation"],
                     case.get("groups", 1))
    real = acc.double() * 0.02 * w_scale.double().view(1, -1, 1, 1)
    spread = real.std(correction=0).item() or real.abs().max().item() or 1.0  # a single output has no spread
    out_scale = spread / 80
    c["multiplier"], c["offset"], c["shift"], c["res_multiplier"] = q8.requantization(
        0.02, -100, case["weight"], w_scale, bias, out_scale, -90,
        0.2 * out_scale if case["residual"] is not None else None, 3)
    return c


@needs_extension
@pytest.mark.parametrize("isa", ["avx2u7", "scalar", "avx2", "avxvnni", "avx512vnni", "amx"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_kernel_seven_bit_bit_exact(case, isa, monkeypatch):
    """7-bit activations: AVX2's vpmaddubsw kernel is exact on them, and out_max = -1 clamps the output."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
    for residual, relu in ((True, True), (False, False)):
        c = seven_bit(make_case(*case, residual=residual, relu=relu))
        ref = reference(c)
        assert ref.max() == -1 and (ref.min() == -90 if relu else ref.min() < -90)  # out_max; ReLU at out_zero
        out = run(c, "cpu")
        assert_bit_exact(out, ref, f"cpu/{isa} 7-bit {case} residual={residual} relu={relu}")
        packed = q8.pack_weight_cpu(c["weight"], c["stride"], c["dilation"], c["x_zero"], c["x_max"])
        assert torch.equal(run(dict(c, packed_weight=packed), "cpu"), ref)


def test_seven_bit_other_backends(device):
    c = seven_bit(make_case(2, 13, 11, 13, 21, 3, 3, 2, 1, 1))
    ref = reference(c)
    assert torch.equal(run(c, "torch"), ref)
    c = on_device(c, device)
    assert torch.equal(run(c, "triton").cpu(), ref)


@needs_extension
def test_seven_bit_kernel_rejects_eight_bit_input(monkeypatch):
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip("avx2u7"))
    monkeypatch.setenv(ALGORITHM_ENV, "direct")  # Winograd's int16 products are exact for any code
    for kernel, stride, padding in ((3, 2, 1), (1, 1, 0)):  # a padded copy; a 1x1 conv's per-task conversion
        c = seven_bit(make_case(1, 8, 6, 6, 16, kernel, kernel, stride=stride, padding=padding))
        c["x"][0, 3, 2, 2] = 0  # one 8-bit code: vpmaddubsw could saturate, so the kernel must refuse
        with pytest.raises(ValueError, match="input code >= 0"):
            run(c, "cpu")


@needs_extension
def test_seven_bit_selection_runs_eight_bit_inputs_exactly(monkeypatch):
    """TLCORE_INT8_CPU_ISA=avx2u7 on a conv whose input may hold 8-bit codes (x_max = 127: a
    reduce_range model's stem) runs AVX2's exact kernel instead of refusing the codes >= 0."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip("avx2u7"))
    assert cpu_isa_for(-128, 127) == CPU_ISAS["avx2"] and cpu_isa_for(-128, -1) == CPU_ISAS["avx2u7"]
    c = make_case(1, 8, 6, 6, 16, 3, 3, stride=2, padding=1)
    c["x"][0, 3] = 127  # a row of the largest codes, where vpmaddubsw's pairs would saturate
    assert_bit_exact(run(c, "cpu"), reference(c), "avx2u7 selected, 8-bit input")


@needs_extension
def test_seven_bit_inputs_pick_vpmaddubsw_only_without_vnni(monkeypatch):
    monkeypatch.delenv(CPU_ISA_ENV, raising=False)  # automatic choice (a run may set the variable)
    monkeypatch.setattr(int8_cpu, "_auto_isa", lambda: CPU_ISAS["avx2"])  # an AVX2 CPU without VNNI
    assert cpu_isa_for(-128, -1) == CPU_ISAS["avx2u7"]
    assert cpu_isa_for(-128, 127) == CPU_ISAS["auto"]  # 8-bit inputs keep the exact int16 kernel
    monkeypatch.setattr(int8_cpu, "_auto_isa", lambda: CPU_ISAS["avxvnni"])  # VNNI is faster and exact anyway
    assert cpu_isa_for(-128, -1) == CPU_ISAS["auto"]


@needs_extension
@pytest.mark.parametrize("isa", TESTED_ISAS)
def test_cpu_kernel_with_prepacked_weight(isa, monkeypatch):
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
    for case in (CASES[0], CASES[7], CASES[4]):
        c = make_case(*case)
        packed = q8.pack_weight_cpu(c["weight"], c["stride"], c["dilation"])
        assert packed.dtype == torch.int32
        assert_bit_exact(run(dict(c, packed_weight=packed), "cpu"), reference(c), f"prepacked {case}")
    with pytest.raises(RuntimeError, match="packed_weight does not match"):
        run(dict(c, packed_weight=packed[:-16]), "cpu")
    # A weight of another shape with as many words: the packed header tells them apart.
    monkeypatch.setenv(ALGORITHM_ENV, "direct")
    c = make_case(2, 14, 11, 13, 21, 3, 3, 2, 1, 1)  # even C: the direct layout's words as the 1 x 9 weight's
    lookalike = c["weight"].reshape(*c["weight"].shape[:2], 1, -1)
    with pytest.raises(ValueError, match="packed for another weight"):
        run(dict(c, packed_weight=q8.pack_weight_cpu(lookalike, c["stride"], c["dilation"])), "cpu")


def test_triton_conv_computes_each_weights_border_corrections_once(monkeypatch, device):
    """Eager Triton calls compute a padded conv's border corrections once per weight and geometry (the
    call configuration's launch plan keeps them), and again after an in-place change, for another zero
    point or input size, or once told the weight changed (forget_derived_values: inference tensors keep
    no version)."""
    from tlcore.kernels import int8_border
    from tlcore.kernels.implicit_gemm import FLAT_K_BELOW

    computed = []
    compute = int8_border.border_corrections
    monkeypatch.setattr(int8_border, "border_corrections", lambda *args: computed.append(args) or compute(*args))
    case = (2, 19, 11, 13, 21, 3, 3, 2, 1, 1)  # padded, strided; channels enough for the per-tap reduction
    assert case[1] >= FLAT_K_BELOW  # (fewer are padded by a copy instead: no corrections)
    c = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in make_case(*case).items()}
    c["weight"] = c["weight"].contiguous(memory_format=torch.channels_last)

    def check(case, what, count):
        assert_bit_exact(run(case, "triton").cpu(), reference({k: v.cpu() if isinstance(v, torch.Tensor) else v
                                                               for k, v in case.items()}), what)
        assert len(computed) == count, what

    for _ in range(2):
        check(c, "cached corrections", 1)
    with torch.no_grad():
        c["weight"].copy_(-c["weight"])  # in place: same tensor, new version
    check(c, "after an in-place change", 2)
    taller = torch.cat([c["x"], c["x"][:, :, :1]], dim=2)  # 12 rows: as many output rows, none at the bottom border
    check(dict(c, x=taller.contiguous(memory_format=torch.channels_last)), "another input size", 3)
    check(c, "back to the first size (its launch plan kept them)", 3)
    check(dict(c, x_zero=c["x_zero"] + 3), "another zero point", 4)
    weight_derived.forget_derived_values(c["weight"])  # (the launch plans too)
    check(dict(c, x_zero=c["x_zero"] + 3), "forgotten", 5)


@needs_extension
def test_cpu_op_packs_each_weight_once(monkeypatch):
    """Without a packed_weight (as in a compiled or exported model) the CPU op packs a weight on its
    first call only, and again after an in-place change of it or under another instruction set."""
    packs = []
    pack = q8.pack_weight_cpu
    monkeypatch.setattr(q8, "pack_weight_cpu", lambda *args: packs.append(args) or pack(*args))
    c = make_case(*CASES[4])
    c["weight"] = c["weight"].contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        assert_bit_exact(run(c, "cpu"), reference(c), "cached packing")
    assert len(packs) == 1
    with torch.no_grad():
        c["weight"].copy_(-c["weight"])  # in place: same tensor, new version
    assert_bit_exact(run(c, "cpu"), reference(c), "after an in-place change")
    assert len(packs) == 2
    monkeypatch.setenv(CPU_ISA_ENV, "scalar")
    assert_bit_exact(run(c, "cpu"), reference(c), "scalar")
    assert len(packs) == 3
    other = dict(c, weight=c["weight"].clone())  # another tensor with the same values: its own entry
    assert_bit_exact(run(other, "cpu"), reference(other), "another weight")
    assert len(packs) == 4
    other["weight"].data = -other["weight"]  # new storage, same tensor and version
    assert_bit_exact(run(other, "cpu"), reference(other), "new storage")
    assert len(packs) == 5
    # A new storage where the old one lay (as when the allocator hands its memory back): two tensors over one
    # buffer have the same data_ptr but storages of their own.
    n, ch, r, s = other["weight"].shape
    memory = bytearray(other["weight"].permute(0, 2, 3, 1).numpy().tobytes())  # (channels_last, as packed)
    over_memory = lambda: torch.frombuffer(memory, dtype=torch.int8).view(n, r, s, ch).permute(0, 3, 1, 2)
    other["weight"].data = over_memory()
    address = other["weight"].data_ptr()
    assert_bit_exact(run(other, "cpu"), reference(other), "a weight over a buffer")
    memory[:] = (-other["weight"]).permute(0, 2, 3, 1).numpy().tobytes()  # no tensor's version sees this
    other["weight"].data = over_memory()
    assert other["weight"].data_ptr() == address
    assert_bit_exact(run(other, "cpu"), reference(other), "another storage at the same address")
    assert len(packs) == 7
    torch.library.opcheck(torch.ops.tlcore._int8_conv_cpu_cached.default,
                          (c["x"], c["weight"], c["multiplier"], c["offset"], c["residual"], c["x_zero"], c["shift"],
                           c["res_multiplier"], c["out_zero"], c["relu"], c["stride"], c["padding"], c["dilation"],
                           c["out_max"], c["x_max"]))


@needs_extension
def test_forgetting_a_weight_forgets_what_its_aliases_derived():
    """forget_derived_values(w) (what Int8Conv2d's load_state_dict calls: under torch.inference_mode an
    in-place write leaves no version) makes stale what was derived through any tensor over w's storage, such
    as a traced module's parameters, which may be other tensor objects over the same storage."""
    c = make_case(*CASES[4])
    with torch.inference_mode():
        weight = c["weight"].contiguous(memory_format=torch.channels_last).clone()  # an inference tensor
        case = dict(c, weight=weight.view_as(weight))  # another tensor object over its storage
        assert_bit_exact(run(case, "cpu"), reference(case), "first call")
        weight.neg_()  # (no version counts this)
        weight_derived.forget_derived_values(weight)
        assert_bit_exact(run(case, "cpu"), reference(case), "after the weight was forgotten")


@needs_extension
def test_cpu_kernel_saturates_exactly(monkeypatch):
    """Extreme operands: the largest accumulators, every output saturated to 127 or -128."""
    x = torch.full((1, 512, 3, 3), -128, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    w = torch.full((34, 512, 3, 3), -127, dtype=torch.int8)  # 34: full 16-channel blocks and a partial one
    w[1::2] = 127
    multiplier, offset, shift, _ = q8.requantization(0.1, 0, w, torch.full((34,), 0.1), None, 0.05, 0)
    for isa in ("scalar", "avx2"):
        monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
        with use_backend("cpu"):
            out = q8.int8_conv2d(x, 0, w, multiplier, offset, shift, padding=1)
        acc = int64_conv(x, 0, w, [1, 1], [1, 1], [1, 1])
        ref = q8.requantize_reference(acc, multiplier, offset, shift, None, 0, 0, False)
        assert torch.equal(out, ref) and ref[0, 0::2].eq(127).all() and ref[0, 1::2].eq(-128).all()


@needs_extension
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512vnni"])
def test_cpu_kernel_exact_when_codes_overflow_int32(isa, monkeypatch):
    """A requantization factor of 50000: codes before the clamp exceed int32, so the AVX2 epilogue's
    int32 shortcut does not apply and the int64 path must give the reference's saturated outputs."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-128, 128, (2, 16, 5, 5), generator=g, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    w = torch.randint(-127, 128, (32, 16, 1, 1), generator=g, dtype=torch.int8)
    x[0, :, 0, 0] = 0  # accumulators of 0 at one pixel: unsaturated outputs too
    multiplier, offset, shift, _ = q8.requantization(1.0, 0, w, torch.ones(32), None, 2e-5, 0)
    with use_backend("cpu"):
        out = q8.int8_conv2d(x, 0, w, multiplier, offset, shift, out_zero=0)
    acc = int64_conv(x, 0, w, [1, 1], [0, 0], [1, 1])
    ref = q8.requantize_reference(acc, multiplier, offset, shift, None, 0, 0, False)
    assert (acc.abs().max() * multiplier.abs().max()) >> shift >= 2**31  # beyond the shortcut
    assert torch.equal(out, ref) and ref.eq(127).any() and ref.eq(-128).any() and ref.eq(0).any()


@needs_extension
@pytest.mark.parametrize("isa,algorithm", [("avx2", "split"), ("avx2", "direct"), ("avx512vnni", "direct")])
@pytest.mark.parametrize("image", [(2, 13, 15, 1), (1, 7, 9, 1), (1, 13, 15, 2)],
                         ids=["chunk-major", "block-major", "block-major-stride2"])
def test_cpu_pointwise_with_weights_beyond_l2(isa, algorithm, image, monkeypatch, two_threads):
    """A 1x1 conv whose packed weights exceed the kernel's L2 budget of 256 KB (1024 x 272: 557 KB as
    int16 pairs, 279 KB as quads), on 2 threads. Over 2 * 13 * 15 = 390 output pixels (9 chunks of 48
    rows, >= 4 per thread) each chunk of rows is converted once and every weight block streams past it;
    over 63 or 56 output pixels (2 chunks) the threads share out the weight blocks, reading one converted
    copy of the whole (strided) input (the split algorithm: its converted codes and top-bit sums)."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
    monkeypatch.setenv(ALGORITHM_ENV, "auto" if algorithm == "split" else "direct")
    n, h, w, stride = image
    c = make_case(n, 1024, h, w, 272, 1, 1, stride=stride, residual=True, relu=True)
    assert cpu_algorithm(c["weight"].shape, c["stride"], [1, 1], CPU_ISAS[isa]) == CPU_ALGORITHMS[algorithm]
    assert_bit_exact(run(c, "cpu"), reference(c), f"cpu/{isa} {algorithm} pointwise 1024 -> 272 on {image}")


# Input codes for the split algorithm, which lists per pixel the channels whose top bits it drops from
# lanes of 4 codes (u = x + 128) summing past 256, or from pairs where most lanes are (dense rows).
SPLIT_CODES = {
    "uniform": lambda g, shape: torch.randint(-128, 128, shape, generator=g),  # dense: the pairs' rule
    "post-relu": lambda g, shape: (torch.randn(shape, generator=g).abs() * 60).round().clamp(max=255) - 128,  # 3% >= 0
    "all-listed": lambda g, shape: torch.randint(0, 128, shape, generator=g),  # every u >= 128
}


def with_codes(case, codes, seed):
    g = torch.Generator().manual_seed(seed)
    x = SPLIT_CODES[codes](g, case["x"].shape).to(torch.int8).contiguous(memory_format=torch.channels_last)
    return dict(case, x=x)


@needs_extension
@pytest.mark.parametrize("codes", SPLIT_CODES)
@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 300), hw=st.tuples(st.integers(1, 13), st.integers(1, 13)),
       k=st.integers(1, 300), stride=st.integers(1, 3), padding=st.integers(0, 2), residual=st.booleans(),
       relu=st.booleans(), seed=st.integers(0, 2**16), reduce_range=st.booleans())
def test_cpu_split_bit_exact(codes, n, c, hw, k, stride, padding, residual, relu, seed, reduce_range):
    """1x1 convs on AVX2 run the split algorithm (two quads per int16 lane, the dropped top bits' weights
    added per listed channel) and equal the reference: any C (32-channel steps and a tail, partial quads,
    an odd last quad), K (partial blocks, the top sums 128 channels at a time and the rest), stride,
    padding (pixels of x_zero), inputs with half, few or all codes >= 0, and 7-bit codes (cut to -1)."""
    h, w = hw
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CPU_ISA_ENV, isa_or_skip("avx2"))
        case = with_codes(make_case(n, c, h, w, k, 1, 1, stride, padding, 1, residual, relu, seed), codes, seed)
        if reduce_range:
            case = dict(case, x=case["x"].clamp(max=-1), x_zero=min(case["x_zero"], -1), x_max=-1)
        isa = cpu_isa_for(case["x_zero"], case["x_max"])
        assert cpu_algorithm(case["weight"].shape, case["stride"], [1, 1], isa) == CPU_ALGORITHMS["split"]
        assert torch.equal(run(case, "cpu"), reference(case)), (n, c, h, w, k, stride, padding)


@needs_extension
# (1024 x 272 packed weights exceed the kernel's L2 budget: with 2 chunks, the whole input is converted first)
@pytest.mark.parametrize("shape", [(2, 40, 13, 15, 36, 1), (1, 1024, 7, 7, 272, 1), (2, 64, 13, 15, 36, 5)],
                         ids=["chunk-by-chunk", "tile-by-tile", "5x5-taps"])
def test_cpu_split_dense_and_sparse_rows_in_one_conv(shape, monkeypatch):
    """Rows converted together take one rule, chosen on their first pixel: an input whose first image
    rows are sparse (post-ReLU-like, mean code 32) and the rest dense (uniform codes) runs both
    micro-kernels in one conv, each tile on the codes its rows were converted for (chunks of 48 rows,
    or tiles of 6 where the conv converts its whole input first: there a chunk holds tiles of both;
    a 5x5 conv's rows hold the codes of 25 taps, some from both halves)."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip("avx2"))
    n, c, h, w, k, r = shape
    case = make_case(n, c, h, w, k, r, r, padding=r // 2, residual=True, relu=True, seed=7)
    g = torch.Generator().manual_seed(7)
    dense = SPLIT_CODES["uniform"](g, case["x"].shape)
    sparse = (torch.randn(case["x"].shape, generator=g).abs() * 40).round().clamp(max=255) - 128
    x = torch.where(torch.arange(h).view(1, 1, h, 1) < h // 2, sparse, dense).to(torch.int8)
    case = dict(case, x=x.contiguous(memory_format=torch.channels_last))
    assert cpu_algorithm(case["weight"].shape, [1, 1], [1, 1], CPU_ISAS["avx2"]) == CPU_ALGORITHMS["split"]
    assert_bit_exact(run(case, "cpu"), reference(case), f"split, dense then sparse rows, {shape}")


@needs_extension
def test_cpu_split_every_last_tile_and_chunk_size(monkeypatch):
    """1 to 13, 49 and 97 output pixels: every partial 6-row tile, and a chunk of 48 rows followed by a
    partial one (each tile's accumulators start from its own rows of the chunk's top-bit sums)."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip("avx2"))
    for pixels in [*range(1, 14), 49, 97]:
        case = with_codes(make_case(1, 40, 1, pixels, 36, 1, 1, relu=False, seed=pixels), "post-relu", pixels)
        assert_bit_exact(run(case, "cpu"), reference(case), f"split on {pixels} pixels")


@needs_extension
@pytest.mark.parametrize("rule", ["pairs", "lanes"])
def test_cpu_split_top_sums_past_int16(rule, monkeypatch):
    """Every code >= 0 at C = 600: each pixel lists every channel (the pairs' rule: bit 7, in units of 128)
    or each twice (the lanes' rule, which a first pixel of zeros picks: bit 7 in a sum then doubled, and
    bit 6, in units of 64), summed in int16 runs whose rows count 256 at most, a doubled one twice
    (|256 * -128| = 2**15), then widened; with rows of weights at -128 and at 127 those sums reach their
    bounds, and the accumulators span +-600 * 127 * 128."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip("avx2"))
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 128, (2, 600, 3, 4), generator=g, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    x[0, :, 0, 0] = 127 if rule == "pairs" else -128  # the rows' first pixel: dense, or no lane past the bound
    x[0, :, 0, 1] = 127
    w = torch.randint(-128, 128, (40, 600, 1, 1), generator=g, dtype=torch.int8)
    w[0], w[1] = -128, 127
    multiplier, offset = torch.randint(1, 4, (40,), generator=g, dtype=torch.int32), torch.zeros(40, dtype=torch.int64)
    with use_backend("cpu"):
        out = q8.int8_conv2d(x, -128, w, multiplier, offset, 12, out_zero=0)
    acc = int64_conv(x, -128, w, [1, 1], [0, 0], [1, 1])
    assert acc[0, 0, 0, 1] == -600 * 127 * 128 and acc[0, 1, 0, 1] == 600 * 127 * 127
    assert_bit_exact(out, q8.requantize_reference(acc, multiplier, offset, 12, None, 0, 0, False),
                     f"split at C = 600, {rule}")


# The split kernel sums 4 products in an int16 lane: channels 8m + (0, 1, 4, 5) and 8m + (2, 3, 6, 7), the
# same lane of quads 2m and 2m + 1. Codes u = x + 128 of one lane around its bound: at weights -128 the
# lane is w * (u0 + u1 + u2 + u3), which leaves int16 past a sum of 256; at 127 past 258. Some need
# bit 7 dropped, some bit 6 (no code >= 128), some both.
LANE_CHANNELS = ((0, 1, 4, 5), (2, 3, 6, 7))
BOUNDARY_LANES = {
    -128: [(255, 0, 0, 0), (255, 1, 0, 0), (255, 2, 0, 0), (64, 64, 64, 64), (64, 64, 64, 65), (128, 128, 0, 0),
           (128, 128, 1, 0), (0, 1, 128, 128), (100, 100, 56, 0), (100, 100, 57, 0), (127, 127, 2, 0),
           (127, 127, 3, 0), (96, 96, 65, 0), (0, 0, 200, 57), (200, 0, 0, 57)],
    127: [(255, 2, 0, 0), (255, 3, 0, 0), (255, 4, 0, 0), (65, 64, 64, 64), (65, 65, 64, 64), (65, 65, 65, 64),
          (127, 127, 4, 0), (127, 127, 5, 0), (0, 0, 4, 255)],
}


@needs_extension
@pytest.mark.parametrize("c", [41, 77])  # a 32-channel step, then whole and partial lanes; 11 quads (odd) or 20
@pytest.mark.parametrize("reduce_range", [False, True], ids=["8-bit", "7-bit"])
@pytest.mark.parametrize("first_pixel", ["sparse", "dense"])
def test_cpu_split_lanes_at_the_int16_bound(c, reduce_range, first_pixel, monkeypatch):
    """The split runs vpmaddubsw on full codes where a lane's 4 codes sum to at most 256 and lists the top
    bits of the rest: output channel k reads only lane k, at weights -128 or 127, with codes summing to
    just under, at and just over the bound in every pixel but the first (7-bit codes: those below 128).
    Offset and shift 6 put those sums' products near 0 at 64 per code, so an overflowed lane changes the
    output. The first pixel decides the rule for the rows converted with it: all codes 0 (sparse) keeps
    the lanes of 4, all 127 (dense, which would list 3 entries a code) takes vpmaddubsw's pairs."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip("avx2"))
    k, pixels = 2 * -(-c // 8), 13
    x = torch.full((1, c, 1, pixels), -128, dtype=torch.int8)
    weight = torch.zeros(k, c, 1, 1, dtype=torch.int8)
    offset = torch.empty(k, dtype=torch.int64)
    for lane in range(k):
        channels = [8 * (lane // 2) + j for j in LANE_CHANNELS[lane % 2] if 8 * (lane // 2) + j < c]
        w = -128 if lane % 3 else 127
        # the lane's codes: those that fit its channels (a partial lane at the end) and the 7-bit range
        fitting = [codes[:len(channels)] for codes in BOUNDARY_LANES[w]
                   if not any(codes[len(channels):]) and max(codes) <= (127 if reduce_range else 255)]
        if not fitting:  # (2 channels of 7-bit codes cannot reach the bound: the lane stays at weight 0)
            offset[lane] = 0
            continue
        weight[lane, channels] = w
        offset[lane] = w * (128 * len(channels) - (256 if w < 0 else 258))  # acc = w * sum(u - 128)
        for pixel in range(1, pixels):
            x[0, channels, 0, pixel] = (torch.tensor(fitting[(pixel + lane) % len(fitting)]) - 128).to(torch.int8)
    x[..., 0] = -128 if first_pixel == "sparse" else (-1 if reduce_range else 127)
    x = x.contiguous(memory_format=torch.channels_last)
    multiplier = torch.ones(k, dtype=torch.int32)
    isa = cpu_isa_for(-128, -1 if reduce_range else 127)
    assert cpu_algorithm(weight.shape, [1, 1], [1, 1], isa) == CPU_ALGORITHMS["split"]
    with use_backend("cpu"):
        out = q8.int8_conv2d(x, -128, weight, multiplier, offset, 6, out_zero=0, x_max=-1 if reduce_range else 127)
    expected = q8.requantize_reference(int64_conv(x, -128, weight, [1, 1], [0, 0], [1, 1]), multiplier, offset, 6,
                                       None, 0, 0, False)
    assert expected[..., 1:].min() > -128 and expected[..., 1:].max() < 127  # no clamping hides an error
    assert torch.equal(out, expected), (out - expected).flatten().nonzero().numel()


def run_split(case, isa):
    """The C++ op on the split algorithm, forced (the automatic choice takes it for fewer convs: see
    int8_best_algorithm)."""
    last = lambda t: None if t is None else t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    case = dict(case, weight=last(case["weight"]), residual=last(case["residual"]))
    code, groups = CPU_ALGORITHMS["split"], case.get("groups", 1)
    packed = torch.ops.tlcore._int8_pack_weight_cpu(case["weight"], isa, code, groups)
    return torch.ops.tlcore._int8_conv_cpu(*_op_args(case)[:14], packed, isa, code, groups)


@needs_extension
@pytest.mark.parametrize("codes", SPLIT_CODES)
@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3), c=st.sampled_from([8, 16, 24, 32, 40, 48, 56, 64]),
       hw=st.tuples(st.integers(1, 12), st.integers(1, 12)), k=st.integers(1, 40),
       rs=st.tuples(st.integers(1, 4), st.integers(1, 4)), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       padding=st.tuples(st.integers(0, 2), st.integers(0, 2)), dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       residual=st.booleans(), relu=st.booleans(), seed=st.integers(0, 2**16), reduce_range=st.booleans())
@example(n=3, c=64, hw=(12, 12), k=40, rs=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), residual=True,
         relu=True, seed=1, reduce_range=False)  # 108 output pixels: converted chunk by chunk
def test_cpu_split_taps_bit_exact(codes, n, c, hw, k, rs, stride, padding, dilation, residual, relu, seed,
                                  reduce_range):
    """Convs with several taps run the split algorithm on one row per output pixel: its taps' codes in the
    weight's (R, S, C) order, x_zero where a tap falls in the padding, the listed channels numbered across
    taps. Equal to the reference for any kernel size, stride, padding and dilation (each its own along
    height and width), C of whole 32-channel steps and with tails of 8-24 channels per tap, inputs with
    few, half or all codes >= 0, and 7-bit codes."""
    (h, w), (r, s) = hw, rs
    assume(r * s > 1)
    if h + 2 * padding[0] < dilation[0] * (r - 1) + 1 or w + 2 * padding[1] < dilation[1] * (s - 1) + 1:
        return
    case = with_codes(make_case(n, c, h, w, k, r, s, stride, padding, dilation, residual, relu, seed), codes, seed)
    if reduce_range:
        case = dict(case, x=case["x"].clamp(max=-1), x_zero=min(case["x_zero"], -1), x_max=-1)
    isa = CPU_ISAS[isa_or_skip("avx2u7" if reduce_range else "avx2")]
    assert torch.equal(run_split(case, isa), reference(case)), (n, c, h, w, k, r, s, stride, padding, dilation)


@needs_extension
def test_cpu_split_taps_chosen_where_measured_faster(monkeypatch):
    """The automatic choice runs the split algorithm on kernels with several taps where C is a multiple of 32
    (the conversion's vector steps) and neither Winograd kernel takes the conv: ResNet-50's 512-channel
    stride-2 3x3 conv, 5x5 and dilated 3x3 convs, and 7-bit stride-2 3x3 ones; the result is the reference's."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip("avx2"))
    avx2, avx2u7, split = CPU_ISAS["avx2"], CPU_ISAS["avx2u7"], CPU_ALGORITHMS["split"]
    assert cpu_algorithm((512, 512, 3, 3), [2, 2], [1, 1], avx2) == split
    assert cpu_algorithm((64, 32, 5, 5), [1, 1], [1, 1], avx2) == split
    assert cpu_algorithm((64, 64, 3, 3), [1, 1], [2, 2], avx2) == split
    assert cpu_algorithm((128, 128, 3, 3), [2, 2], [1, 1], avx2u7) == split
    assert cpu_algorithm((128, 128, 3, 3), [2, 2], [1, 1], avx2) == CPU_ALGORITHMS["winograd_stride2"]
    assert cpu_algorithm((64, 64, 3, 3), [1, 1], [1, 1], avx2) == CPU_ALGORITHMS["winograd"]
    assert cpu_algorithm((64, 40, 5, 5), [1, 1], [1, 1], avx2) == CPU_ALGORITHMS["direct"]
    case = with_codes(make_case(2, 32, 11, 9, 24, 5, 5, 1, 2, 1, residual=True, relu=True, seed=3), "post-relu", 3)
    assert_bit_exact(run(case, "cpu"), reference(case), "split, 5x5 over 32 channels")


@needs_extension
@pytest.mark.parametrize("rule", ["pairs", "lanes"])
def test_cpu_split_taps_top_sums_past_int16(rule, monkeypatch):
    """A 3x3 stride-3 conv over C = 96: each pixel's row holds 864 codes, every one >= 0 from the second
    pixel on, so its list runs past the int16 sums' 256 rows (as at C = 600 for a 1x1 conv) with channels
    numbered across taps; the first pixel's window (all 127, or all -128) picks the rule. Weights at -128
    and 127 take the accumulators to +-864 * 127 * 128."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip("avx2"))
    g = torch.Generator().manual_seed(6)
    x = torch.randint(0, 128, (2, 96, 6, 7), generator=g, dtype=torch.int8)
    x[0, :, 0:3, 0:3] = 127 if rule == "pairs" else -128  # the first output pixel's window
    x[0, :, 0:3, 3:6] = 127  # the second's
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-128, 128, (40, 96, 3, 3), generator=g, dtype=torch.int8)
    w[0], w[1] = -128, 127
    multiplier, offset = torch.randint(1, 4, (40,), generator=g, dtype=torch.int32), torch.zeros(40, dtype=torch.int64)
    case = dict(x=x, x_zero=-128, weight=w, multiplier=multiplier, offset=offset, shift=14, residual=None,
                res_multiplier=0, out_zero=0, relu=False, stride=[3, 3], padding=[0, 0], dilation=[1, 1],
                out_max=127, x_max=127)
    acc = int64_conv(x, -128, w, [3, 3], [0, 0], [1, 1])
    assert acc[0, 0, 0, 1] == -864 * 127 * 128 and acc[0, 1, 0, 1] == 864 * 127 * 127
    assert_bit_exact(run_split(case, CPU_ISAS["avx2"]),
                     q8.requantize_reference(acc, multiplier, offset, 14, None, 0, 0, False), f"split taps, {rule}")


@needs_extension
def test_cpu_split_taps_row_limits():
    """The largest row the split algorithm takes, 4 x 4 taps of C = 4096 (65536 codes, the last channel
    numbered 65535 in its uint16 lists), every code >= 0 so that the lists hold channels past 32767; a
    row one lane longer, and C % 8 != 0 (a tap would start inside a lane), are refused when forced and
    left to the direct kernel by the automatic choice."""
    g = torch.Generator().manual_seed(8)
    avx2 = CPU_ISAS[isa_or_skip("avx2")]
    case = make_case(1, 4096, 4, 5, 3, 4, 4, relu=False, seed=8)
    case["x"] = torch.randint(0, 128, case["x"].shape, generator=g, dtype=torch.int8).contiguous(
        memory_format=torch.channels_last)
    case = dict(case, x_zero=-128, residual=None)
    assert cpu_algorithm(case["weight"].shape, [1, 1], [1, 1], avx2) == CPU_ALGORITHMS["split"]
    assert torch.equal(run_split(case, avx2), reference(case))
    split = CPU_ALGORITHMS["split"]
    for c, r in ((4104, 4), (12, 5)):  # 65664 codes; 12 channels a tap
        refused = make_case(1, c, 5, 5, 3, r, r, residual=False, seed=8)
        refused["weight"] = refused["weight"].contiguous(memory_format=torch.channels_last)
        assert cpu_algorithm(refused["weight"].shape, [1, 1], [1, 1], avx2) == CPU_ALGORITHMS["direct"]
        with pytest.raises(ValueError, match="no packing of this algorithm"):
            torch.ops.tlcore._int8_pack_weight_cpu(refused["weight"], avx2, split)
        with pytest.raises(RuntimeError, match="cannot run this conv"):
            torch.ops.tlcore._int8_conv_cpu(*_op_args(refused)[:14], None, avx2, split)


@needs_extension
@pytest.mark.parametrize("algorithm", ["direct", "winograd"])
@pytest.mark.parametrize("shift", [20, 31, 32, 36])
def test_avx2_epilogue_both_shift_routes(shift, algorithm, monkeypatch):
    """The AVX2 epilogue floors total / 2**shift from the int64 total's high word when shift >= 32 and
    by a logical shift's low word below: both bit-exact with residual, ReLU and outputs in every regime
    (saturated high and low, in range). K = 32 (full blocks: the AVX2 epilogue, not the scalar tail)
    and 2 * 7 * 9 = 126 output pixels (two 48-row chunks of the direct kernel and a partial one)."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip("avx2"))
    monkeypatch.setenv(ALGORITHM_ENV, "auto" if algorithm == "winograd" else "direct")
    c, ref = shift_route_case(shift, make_case(2, 10, 7, 9, 32, 3, 3, padding=1, residual=True, relu=True, x_zero=3))
    assert cpu_algorithm(c["weight"].shape, [1, 1], [1, 1], cpu_isa_for(3, 127)) == CPU_ALGORITHMS[algorithm]
    assert_bit_exact(run(c, "cpu"), ref, f"avx2 epilogue shift={shift} {algorithm}")


@pytest.mark.parametrize("pointwise", [False, True], ids=["3x3-padded", "1x1"])
@pytest.mark.parametrize("shift", [1, 2, 3, 20, 31, 32, 36])
def test_triton_epilogue_shift_routes(shift, pointwise, device):
    """The Triton kernel floors total / 2**shift from the int64 total's high word (shift >= 32), from
    its two words after clamping the high one (3 <= shift < 32), or in int64 (below): each bit-exact
    with residual, ReLU and saturated outputs, in the padded kernel (the input tile filled with the
    zero point) and the unpadded one (no fill)."""
    from tlcore.kernels.int8_conv import shift_route

    assert shift_route(shift) == ("high" if shift >= 32 else "split" if shift >= 3 else "int64")
    shape = (2, 40, 5, 6, 32, 1, 1) if pointwise else (2, 20, 7, 9, 32, 3, 3)  # C >= FLAT_K_BELOW: per tap
    c, ref = shift_route_case(shift, make_case(*shape, padding=0 if pointwise else 1, residual=True, relu=True,
                                               x_zero=3))
    c = on_device(c, device)
    assert_bit_exact(run(c, "triton").cpu(), ref, f"triton epilogue shift={shift} pointwise={pointwise}")


def shift_route_case(shift, c):
    """Case c (32 output channels) with hand-made constants at `shift` whose codes land in every regime
    (saturated high and low, in range), and its reference. Below shift 8, x within 2 of its zero point
    and weights in [-1, 1] keep the accumulators small enough for multipliers of several units."""
    g = torch.Generator().manual_seed(shift)
    if shift < 8:
        c["x"] = (c["x_zero"] + torch.randint(-2, 3, c["x"].shape, generator=g)).to(torch.int8) \
            .contiguous(memory_format=torch.channels_last)
        c["weight"] = torch.randint(-1, 2, c["weight"].shape, generator=g, dtype=torch.int8)
    acc = int64_conv(c["x"], c["x_zero"], c["weight"], c["stride"], c["padding"], c["dilation"])
    # Codes ~ +-60 per standard deviation of acc, offsets of up to +-100 codes, a residual of up to +-32.
    factor = 2.0**shift * 60 / acc.double().std().item()
    multiplier = (factor * (0.5 + torch.rand(32, generator=g, dtype=torch.float64))).round().to(torch.int32)
    multiplier[::5] *= -1
    offset = (2.0**shift * 100 * (2 * torch.rand(32, generator=g, dtype=torch.float64) - 1)).to(torch.int64)
    c.update(multiplier=multiplier, offset=offset, shift=shift, res_multiplier=min(2 ** max(shift - 2, 0), 2**31 - 1),
             out_zero=-7)
    ref = reference(c)
    assert ref.eq(127).any() and ref.eq(-7).any() and ((ref > -7) & (ref < 127)).float().mean() > 0.3
    return c, ref


@needs_extension
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avxvnni", "avx512vnni"])
@pytest.mark.parametrize("shift, out_zero", [(55, -128), (56, -128), (57, 120), (62, -2)])
def test_cpu_epilogue_large_shifts(shift, out_zero, isa, monkeypatch):
    """Shifts up to the op's limit of 62 with totals near the 2**62 headroom (huge_total_case): the
    vector epilogues fold out_zero * 2**shift into the int64 totals (the AVX-512 one wrapped above
    shift 55), so they leave shifts above 54 to the scalar one."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
    c, ref = huge_total_case(shift, out_zero)
    out = run(c, "cpu")
    assert torch.equal(out, ref), f"cpu/{isa} shift={shift}: {(out != ref).sum().item()} codes differ"


@pytest.mark.parametrize("shift, out_zero", [(3, -128), (17, 120), (31, 120), (32, -7), (62, -2)])
def test_triton_epilogue_huge_totals(shift, out_zero, device):
    """Totals near the 2**62 headroom (offsets up to +-2**61): below shift 31 their quotients pass
    2**30, and the 32-bit route must still saturate them (it clamps the total's high word first)."""
    c, ref = huge_total_case(shift, out_zero, channels=24)  # past FLAT_K_BELOW: the per-tap kernel
    c = on_device(c, device)
    out = run(c, "triton").cpu()
    assert torch.equal(out, ref), f"triton shift={shift}: {(out != ref).sum().item()} codes differ"


def huge_total_case(shift, out_zero, channels=8):
    """A 1x1 case (K = 64, full channel blocks) with offsets up to +-2**61 and |acc * multiplier| <
    2**49, so the offsets decide the codes (one per channel: compared whole, not by assert_bit_exact,
    whose spread check assumes codes that vary with the input), and its reference."""
    g = torch.Generator().manual_seed(shift)
    c = make_case(2, channels, 5, 7, 64, 1, 1, relu=False)
    c.update(multiplier=torch.randint(-2**20, 2**20, (64,), generator=g, dtype=torch.int32),
             offset=((2 * torch.rand(64, generator=g, dtype=torch.float64) - 1) * 2.0**61).to(torch.int64),
             shift=shift, out_zero=out_zero)
    ref = reference(c)
    assert ref.unique().numel() > 1
    return c, ref


@needs_extension
@pytest.mark.parametrize("relu", [False, True])
def test_avx512_epilogue_saturates_with_residual(relu, monkeypatch):
    """avx512vnni's AVX-512 epilogue (codes fit int32): a tenth of make_case's output scale saturates
    many outputs at 127 and at -128 (or the ReLU floor, out_zero -7), with a residual added; K = 40
    ends in a partial 16-channel block and 2 * 63 output pixels in a partial 12-row tile."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip("avx512vnni"))
    c = make_case(2, 8, 7, 9, 40, 3, 3, padding=1, residual=True, relu=relu, x_zero=5)
    g = torch.Generator().manual_seed(3)
    w_scale, bias = torch.rand(40, generator=g) * 0.01 + 1e-3, torch.randn(40, generator=g) * 5
    out_scale = 0.02 * w_scale.mean().item() * 74 * (8 * 9 * (74**2 + 25)) ** 0.5 / 400
    multiplier, offset, shift, res_multiplier = q8.requantization(0.02, 5, c["weight"], w_scale, bias, out_scale,
                                                                  -7, 3 * out_scale, 11)
    c.update(multiplier=multiplier, offset=offset, shift=shift, res_multiplier=res_multiplier)
    ref = reference(c)
    floor = -7 if relu else -128
    assert ref.eq(127).float().mean() > 0.1 and ref.eq(floor).float().mean() > 0.1 and ref.min() == floor
    assert_bit_exact(run(c, "cpu"), ref, f"avx512 epilogue relu={relu}")
    packed = q8.pack_weight_cpu(c["weight"], c["stride"], c["dilation"])
    assert_bit_exact(run(dict(c, packed_weight=packed), "cpu"), ref, f"avx512 epilogue prepacked relu={relu}")


@needs_extension
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 40), hw=st.tuples(st.integers(1, 12), st.integers(1, 12)),
       k=st.integers(1, 40), rs=st.sampled_from([(1, 1), (3, 3), (1, 3), (5, 5)]), stride=st.integers(1, 3),
       padding=st.integers(0, 2), dilation=st.integers(1, 2), residual=st.booleans(), relu=st.booleans(),
       seed=st.integers(0, 2**16))
def test_cpu_kernel_random_shapes(n, c, hw, k, rs, stride, padding, dilation, residual, relu, seed):
    (h, w), (r, s) = hw, rs
    if h + 2 * padding < dilation * (r - 1) + 1 or w + 2 * padding < dilation * (s - 1) + 1:
        return  # no output pixel; the error path has its own test
    c_ = make_case(n, c, h, w, k, r, s, stride, padding, dilation, residual, relu, seed)
    out, ref = run(c_, "cpu"), reference(c_)
    assert torch.equal(out, ref), f"{(n, c, h, w, k, r, s, stride, padding, dilation)}"


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(16, 40), hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       k=st.integers(1, 40), rs=st.sampled_from([(3, 3), (1, 3), (5, 2)]),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 2)), padding=st.tuples(st.integers(0, 3), st.integers(1, 2)),
       dilation=st.tuples(st.integers(1, 3), st.integers(1, 2)), groups=st.sampled_from([1, 2]),
       residual=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_kernel_random_padded_shapes(n, c, hw, k, rs, stride, padding, dilation, groups, residual, seed):
    """Padded convs of every geometry (images smaller than the window included), whose padding the
    Triton kernel adds to its accumulator per border row and column class (kernels/int8_border.py)."""
    (h, w), (r, s) = hw, rs
    assume(h + 2 * padding[0] >= dilation[0] * (r - 1) + 1 and w + 2 * padding[1] >= dilation[1] * (s - 1) + 1)
    case = make_case(n, c - c % groups, h, w, k * groups, r, s, stride, padding, dilation, residual, True, seed,
                     groups=groups)
    ref = reference(case)
    out = run(on_device(case, "cuda" if torch.cuda.is_available() else "cpu"), "triton").cpu()
    assert torch.equal(out, ref), f"{(n, c, h, w, k, r, s, stride, padding, dilation, groups)}"


@needs_extension
@pytest.mark.parametrize("isa", TESTED_ISAS + ["avx2u7"])
@pytest.mark.parametrize("kernel", [(1, 0), (3, 1)], ids=["1x1", "3x3"])
def test_cpu_kernel_every_last_tile_size(isa, kernel, monkeypatch):
    """1 to 13 and 49 output pixels: every partial last tile of the 6-row (AVX2, scalar) and the 12-row
    (AVX-512 VNNI) micro-kernels, which compute only the rows a tile has."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
    monkeypatch.setenv(ALGORITHM_ENV, "direct")
    r, padding = kernel
    for pixels in [*range(1, 14), 49]:
        case = make_case(1, 10, 1, pixels, 36, r, r, padding=padding, relu=False, seed=pixels)
        if isa == "avx2u7":
            case = seven_bit(case)
        assert_bit_exact(run(case, "cpu"), reference(case), f"cpu/{isa} {r}x{r} on {pixels} pixels")


# The AMX kernel's sources of tile rows (csrc/cpu/int8_amx.cpp): in place (stride 1, whole steps a
# pixel) over the padded input, dropping the extra columns of each output row, or over x itself
# (pointwise, C % 64 == 0), and gathered panels otherwise; with blocks in pairs and alone, and
# partial blocks.
AMX_CASES = [  # n, c, h, w, k, r, s, stride, padding, dilation
    (2, 64, 6, 9, 33, 3, 3, 1, 1, 1),      # in place: two images, a pair of blocks then one of 1 channel
    (1, 128, 11, 10, 48, 3, 3, 1, 1, 1),   # in place: 110 rows a image, chunks of 64 across output rows
    (3, 64, 4, 5, 20, 3, 3, 1, 2, 2),      # in place, dilated: taps two pixels apart, images of 2 rows
    (1, 64, 3, 4, 16, 5, 5, 1, 2, 1),      # in place: the window wider than the image
    (2, 64, 9, 9, 40, 3, 3, 2, 1, 1),      # panel: stride 2
    (2, 64, 7, 7, 32, 1, 1, 1, 0, 1),      # pointwise, signed codes in place; the last 34 rows copied
    (2, 63, 7, 7, 32, 1, 1, 1, 0, 1),      # panel: pointwise, 16 words a pixel but 63-byte pixels in x
    (1, 125, 9, 8, 16, 1, 1, 1, 0, 1),     # panel: the same with 32 words (125 channels)
    (2, 61, 5, 6, 20, 3, 3, 1, 1, 1),      # in place over the padded input, 16 words a pixel (3 bytes zero)
    (1, 36, 5, 5, 16, 1, 1, 1, 0, 1),      # panel: pointwise, 9 words a pixel, converted in one run
    (1, 100, 9, 7, 17, 1, 1, 2, 0, 1),     # panel: strided pointwise, 25 words a row (a partial step)
    (1, 96, 5, 6, 24, 3, 3, 1, 1, 1),      # panel: stride 1 but 24 words a pixel (not whole steps)
    (2, 3, 15, 13, 24, 7, 7, 2, 3, 1),     # panel: the stem, one word a pixel, 7-word tap rows
    (1, 20, 9, 9, 16, 3, 3, 2, 2, 2),      # panel: dilated, each tap a 5-word run
]


@needs_extension
@pytest.mark.parametrize("case", AMX_CASES, ids=["x".join(map(str, c[:7])) for c in AMX_CASES])
def test_amx_kernel_bit_exact(case, monkeypatch):
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip("amx"))
    for residual, relu in ((True, True), (False, False)):
        c = make_case(*case, residual=residual, relu=relu)
        assert_bit_exact(run(c, "cpu"), reference(c), f"cpu/amx {case} residual={residual} relu={relu}")


@needs_extension
def test_amx_packing_pads_each_block_to_whole_steps():
    """16 channels a block, (tap, group) rows rounded up to 16 (one TDPBUSD step) with zero weights,
    then 128 * sum(w) per channel: 3x3 over 20 channels (5 words a pixel, 45 rows -> 48), K = 40."""
    isa = CPU_ISAS[isa_or_skip("amx")]
    header, blocks = 16, 3
    assert torch.ops.tlcore._int8_cpu_packed_words(40, 20, 3, 3, isa, 0, 1) == header + blocks * 48 * 16 + blocks * 16


WINOGRAD_ISAS = ["scalar", "avx2", "avx2u7"]  # the int16-pairs instruction sets


@needs_extension
@pytest.mark.parametrize("isa", WINOGRAD_ISAS)
def test_cpu_winograd_every_last_tile_size(isa, monkeypatch):
    """1 to 7 and 13 Winograd tiles (2x4 outputs each): every partial last micro-tile of 6."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
    for tiles in [*range(1, 8), 13]:
        case = make_case(1, 12, 2, 4 * tiles, 36, 3, 3, padding=1, relu=False, seed=tiles)
        if isa == "avx2u7":
            case = seven_bit(case)
        isa_code = cpu_isa_for(case["x_zero"], case["x_max"])
        assert cpu_algorithm(case["weight"].shape, [1, 1], [1, 1], isa_code) == CPU_ALGORITHMS["winograd"]
        assert_bit_exact(run(case, "cpu"), reference(case), f"winograd/{isa} {tiles} tiles")


@needs_extension
@pytest.mark.parametrize("isa", WINOGRAD_ISAS)
@pytest.mark.parametrize("stride", [1, 2])
@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 70), hw=st.tuples(st.integers(1, 13), st.integers(1, 13)),
       k=st.integers(1, 40), padding=st.integers(0, 2), residual=st.booleans(), relu=st.booleans(),
       seed=st.integers(0, 2**16))
def test_cpu_winograd_bit_exact(isa, stride, n, c, hw, k, padding, residual, relu, seed):
    """3x3 convs run by Winograd (stride 1: F(4x4, 3x3) here, C <= 227; stride 2: its 2x2 tiles; odd sizes:
    partly empty edge tiles) equal the reference."""
    h, w = hw
    if h + 2 * padding < 3 or w + 2 * padding < 3:
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
        case = make_case(n, c, h, w, k, 3, 3, stride, padding, 1, residual, relu, seed)
        if isa == "avx2u7":
            case = seven_bit(case)
        isa = cpu_isa_for(case["x_zero"], case["x_max"])
        # 7-bit codes run stride-2 convs on vpmaddubsw (its products are cheaper than Winograd's saving):
        # the split algorithm where C is a multiple of 32, else direct.
        seven = "split" if c % 32 == 0 else "direct"
        algorithm = "winograd" if stride == 1 else seven if isa == CPU_ISAS["avx2u7"] else "winograd_stride2"
        assert cpu_algorithm(case["weight"].shape, case["stride"], [1, 1], isa) == CPU_ALGORITHMS[algorithm]
        assert torch.equal(run(case, "cpu"), reference(case)), (n, c, h, w, k, padding)
        packed = q8.pack_weight_cpu(case["weight"], case["stride"], [1, 1], case["x_zero"], case["x_max"])
        assert torch.equal(run(dict(case, packed_weight=packed), "cpu"), reference(case))


@needs_extension
@pytest.mark.parametrize("shape", [(1, 64, 7, 7, 40), (1, 512, 12, 16, 20), (3, 16, 66, 70, 24)],
                         ids=["one-chunk-per-thread", "k-split-chunks", "many-chunks"])
def test_cpu_winograd_task_layouts(shape, monkeypatch, two_threads):
    """Each way the Winograd kernel splits its work over 2 threads equals the reference: a small image's
    tiles as one chunk with K split per thread (transformed tiles <= 512 KB), few chunks with K split
    (C = 512 at 12x16: 590 KB of transformed tiles), and many chunks (918 4x4 tiles of C = 16: 20 chunks of 48)."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip("avx2"))
    n, c, h, w, k = shape
    case = make_case(n, c, h, w, k, 3, 3, padding=1, residual=True, relu=True, seed=c)
    assert cpu_algorithm(case["weight"].shape, [1, 1], [1, 1], CPU_ISAS["avx2"]) == CPU_ALGORITHMS["winograd"]
    assert_bit_exact(run(case, "cpu"), reference(case), f"winograd {shape}")


THREAD_CASES = {  # isa, algorithm, (n, c, h, w, k, r, stride, padding)
    "split-chunks": ("avx2", "split", (2, 40, 13, 15, 36, 1, 1, 0)),  # 390 pixels: chunk by chunk
    "split-whole-input": ("avx2", "split", (1, 1024, 7, 7, 272, 1, 1, 0)),  # 49 pixels, converted tile by tile
    "split-taps": ("avx2", "split", (2, 32, 25, 23, 40, 5, 2, 2)),  # 312 pixels of 800 codes, chunk by chunk
    "split-taps-whole-input": ("avx2", "split", (1, 256, 9, 9, 48, 5, 1, 2)),  # 307 KB of weights, 81 pixels
    "avx2-direct": ("avx2", "direct", (1, 24, 11, 9, 56, 3, 2, 1)),
    "winograd": ("avx2", "winograd", (2, 16, 30, 26, 24, 3, 1, 1)),
    "avx512vnni": ("avx512vnni", "direct", (1, 40, 13, 11, 72, 3, 1, 1)),
    "amx": ("amx", "direct", (2, 70, 9, 11, 48, 3, 1, 1)),
}


@needs_extension
@pytest.mark.parametrize("threads", [1, 3, 5])
@pytest.mark.parametrize("kind", THREAD_CASES)
def test_cpu_kernel_any_thread_count(kind, threads, monkeypatch):
    """The threads claim runs of tasks from a shared counter (parallel_tasks): on 1, 3 or 5 threads, with
    tasks of unequal cost (short last chunks and tiles), every output is computed, once."""
    isa, algorithm, (n, c, h, w, k, r, stride, padding) = THREAD_CASES[kind]
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
    monkeypatch.setenv(ALGORITHM_ENV, "direct" if algorithm == "direct" else "auto")
    case = make_case(n, c, h, w, k, r, r, stride, padding, residual=True, relu=True, seed=threads)
    assert cpu_algorithm(case["weight"].shape, case["stride"], [1, 1], CPU_ISAS[isa]) == \
        CPU_ALGORITHMS[algorithm]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = run(case, "cpu")
    finally:
        torch.set_num_threads(before)
    assert_bit_exact(out, reference(case), f"{kind} on {threads} threads")


@needs_extension
@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_cpu_stride_two_winograd_at_the_reduction_limit(isa, monkeypatch):
    """Stride-2 Winograd at the largest C int32 accumulation allows (9 C * 128 * 128 < 2**31): every
    tap and product at +-128 * 128, int16 transforms at their bounds (|U| = 4 * 128 for the -128
    weights); and past C * K = 256 * 256 the direct kernel takes over."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
    c = q8.MAX_REDUCTION // 9
    isa_code = cpu_isa_for(-128, 127)
    assert cpu_algorithm((2, c, 3, 3), [2, 2], [1, 1], isa_code) == CPU_ALGORITHMS["winograd_stride2"]
    assert cpu_algorithm((256, 258, 3, 3), [2, 2], [1, 1], isa_code) == CPU_ALGORITHMS["direct"]
    x = torch.full((1, c, 4, 5), -128, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    w = torch.full((2, c, 3, 3), -128, dtype=torch.int8)
    w[1] = 127
    multiplier, offset = torch.ones(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int64)
    with use_backend("cpu"):  # padding reads x_zero = -128 too: acc = 9 * C * (+-128 * 128) everywhere
        out = q8.int8_conv2d(x, -128, w, multiplier, offset, 24, stride=2, padding=1, out_zero=0)
    acc = int64_conv(x, -128, w, [2, 2], [1, 1], [1, 1])
    assert acc[0, 0].eq(9 * c * 128 * 128).all() and acc.abs().max() < 2**31
    assert torch.equal(out, q8.requantize_reference(acc, multiplier, offset, 24, None, 0, 0, False))


@needs_extension
@pytest.mark.parametrize("isa", ["scalar", "avx2"])
@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 2), c=st.sampled_from([1, 3, 5, 7]), hw=st.tuples(st.integers(1, 15), st.integers(1, 15)),
       k=st.integers(1, 40), rs=st.tuples(st.integers(1, 7), st.integers(2, 7)), stride=st.tuples(st.integers(1, 3),
       st.sampled_from([2, 4])), padding=st.tuples(st.integers(0, 3), st.integers(0, 3)), dilation_h=st.integers(1, 2),
       residual=st.booleans(), relu=st.booleans(), seed=st.integers(0, 2**16))
def test_cpu_rows_layout_bit_exact(isa, n, c, hw, k, rs, stride, padding, dilation_h, residual, relu, seed):
    """Odd C with an even stride_w * C (the RGB stem's 7x7/2) runs the rows layout and equals the reference."""
    (h, w), (r, s) = hw, rs
    assume((r, s, stride, dilation_h) != (3, 3, (2, 2), 1))  # stride-2 Winograd's; its own test
    if h + 2 * padding[0] < dilation_h * (r - 1) + 1 or w + 2 * padding[1] < s:
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
        case = make_case(n, c, h, w, k, r, s, stride, padding, (dilation_h, 1), residual, relu, seed)
        algorithm = cpu_algorithm(case["weight"].shape, case["stride"], case["dilation"], CPU_ISAS[isa])
        assert algorithm == CPU_ALGORITHMS["rows"]
        assert torch.equal(run(case, "cpu"), reference(case)), (n, c, h, w, k, r, s, stride, padding, dilation_h)


@needs_extension
def test_cpu_algorithm_direct_and_packing_mismatch(monkeypatch):
    """TLCORE_INT8_CPU_ALGORITHM=direct runs the direct kernel; a weight packed for one algorithm is refused by another."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip("avx2"))
    for case, algorithm in (((2, 16, 9, 9, 24, 3, 3, 1, 1, 1), "winograd"), ((1, 3, 17, 19, 16, 7, 7, 2, 3, 1), "rows"),
                            ((2, 14, 11, 13, 21, 3, 3, 2, 1, 1), "winograd_stride2"),
                            ((2, 16, 9, 9, 24, 1, 1, 1, 0, 1), "split"), ((2, 32, 9, 9, 24, 5, 5, 1, 2, 1), "split")):
        c = make_case(*case)
        assert cpu_algorithm(c["weight"].shape, c["stride"], [1, 1], CPU_ISAS["avx2"]) == \
            CPU_ALGORITHMS[algorithm]
        packed = q8.pack_weight_cpu(c["weight"], c["stride"], c["dilation"])
        monkeypatch.setenv(ALGORITHM_ENV, "direct")
        assert cpu_algorithm(c["weight"].shape, c["stride"], [1, 1], CPU_ISAS["avx2"]) == 0
        assert_bit_exact(run(c, "cpu"), reference(c), f"direct {case}")
        with pytest.raises(RuntimeError, match="packed_weight"):
            run(dict(c, packed_weight=packed), "cpu")
        monkeypatch.delenv(ALGORITHM_ENV)
    monkeypatch.setenv(ALGORITHM_ENV, "sometimes")
    with pytest.raises(ValueError, match="auto or direct"):
        run(c, "cpu")


@needs_extension
@pytest.mark.parametrize("isa", ["scalar", "avx2"])
@pytest.mark.parametrize("tiles", ["4x4", "2x4", "2x2"])
def test_cpu_winograd_at_its_channel_limits_stays_exact(tiles, isa, monkeypatch):
    """The largest accumulators each Winograd tile shape accepts (its Y' = 576, 48 or 4 * acc recovered
    from wrapped int32 sums): every tap and product at +-128 * 128, at C = 227 (4x4), 910 (2x4) and 3640
    (2x2), and one channel past the first two, where the next shape takes over."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
    limit = {"4x4": WINOGRAD_4X4_MAX_CHANNELS, "2x4": WINOGRAD_2X4_MAX_CHANNELS,
             "2x2": (2**31 - 1) // (4 * 128 * 128 * 9)}[tiles]
    isa_code = cpu_isa_for(-128, 127)
    assert cpu_algorithm((1, limit, 3, 3), [1, 1], [1, 1], isa_code) == CPU_ALGORITHMS["winograd"]
    if tiles == "2x2":
        assert cpu_algorithm((1, limit + 1, 3, 3), [1, 1], [1, 1], isa_code) != CPU_ALGORITHMS["winograd"]
    # The shape that runs: its packed weights (one block of 16 channels) are a header of 16 words and
    # per position C / 2 int16 pairs, rounded up to 8, for each of the 16 channels.
    positions = {"4x4": 36, "2x4": 24, "2x2": 16}[tiles]
    assert torch.ops.tlcore._int8_cpu_packed_words(16, limit, 3, 3, isa_code, CPU_ALGORITHMS["winograd"], 1) == \
        16 + positions * -(-limit // 16) * 8 * 16
    sizes = [limit] if tiles == "2x2" else [limit, limit + 1]
    for c in sizes:
        x = torch.full((1, c, 2, 5), -128, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
        w = torch.full((2, c, 3, 3), -128, dtype=torch.int8)
        w[1] = 127
        multiplier, offset = torch.ones(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int64)
        with use_backend("cpu"):  # padding reads x_zero = -128 too: acc = 9 * C * (+-128 * 128) everywhere
            out = q8.int8_conv2d(x, -128, w, multiplier, offset, 24, padding=1, out_zero=0)
        acc = int64_conv(x, -128, w, [1, 1], [1, 1], [1, 1])
        assert acc[0, 0].eq(9 * c * 128 * 128).all()
        assert torch.equal(out, q8.requantize_reference(acc, multiplier, offset, 24, None, 0, 0, False))


TRITON_CASES = [CASES[0], CASES[2], CASES[4], CASES[5], CASES[6], (1, 512, 3, 3, 8, 3, 3, 1, 1, 1),
                (2, 18, 6, 7, 12, 1, 1, 1, 1, 1),   # a padded 1x1 conv: its border outputs read only padding
                (2, 20, 9, 9, 24, 1, 1, 2, 0, 1),   # a strided 1x1 conv (downsample) past the flat path's C
                (1, 70, 6, 5, 20, 3, 3, 1, 1, 1)]   # two channel blocks a tap, the second partial


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "x".join(map(str, c[:7])))
def test_triton_kernel_bit_exact(device, case):
    c = make_case(*case, residual=case[1] != 33, relu=case[1] != 5)
    ref = reference(c)
    c = on_device(c, device)
    assert_bit_exact(run(c, "triton").cpu(), ref, f"triton {case}")


def test_triton_launcher_writes_every_output(device):
    """Two runs into buffers poisoned with different values must both equal the reference; the
    launcher called directly with NCHW weights (8-channel groups: their strides matter)."""
    from tlcore.kernels.int8_conv import int8_conv2d

    c = make_case(2, 16, 7, 6, 70, 3, 3, padding=1, groups=2)
    ref = reference(c)
    c = on_device(c, device)
    for poison in (85, -42):
        out = torch.full(ref.shape, poison, dtype=torch.int8, device=device).contiguous(
            memory_format=torch.channels_last)
        int8_conv2d(c["x"], c["x_zero"], c["weight"], c["multiplier"], c["offset"], c["shift"], c["residual"],
                    c["res_multiplier"], c["out_zero"], c["relu"], c["stride"], c["padding"], c["dilation"], 127, out,
                    groups=2)
        assert torch.equal(out.cpu(), ref)


def in_layout(t, layout):
    """t (N, C, H, W) with the same values in a memory layout: channels_last, contiguous (NCHW), or a
    view into a bigger channels_last tensor: of its later images (the pixels still in row order, as
    the kernels' PIXEL_ROWS want), or of its lower rows or right columns (not)."""
    nhwc = torch.channels_last
    if layout in ("channels_last", "contiguous"):
        return t.contiguous(memory_format=nhwc if layout == "channels_last" else torch.contiguous_format)
    if layout == "later_images":
        return torch.cat([t[:1], t]).contiguous(memory_format=nhwc)[1:]
    if layout == "lower_rows":
        return F.pad(t, (0, 0, 1, 0)).contiguous(memory_format=nhwc)[:, :, 1:]
    assert layout == "right_columns"
    return F.pad(t, (1, 0)).contiguous(memory_format=nhwc)[..., 1:]


@pytest.mark.parametrize("residual_layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("x_layout", ["channels_last", "contiguous", "later_images", "lower_rows", "right_columns"])
def test_triton_pointwise_conv_reads_pixel_rows_only_where_they_are(device, x_layout, residual_layout):
    """A 1x1 stride-1 conv takes output row m from x's pixel m (X_PIXEL_ROWS) only when x's pixels
    lie in row order, and the epilogue addresses out and the residual by row (OUT_PIXEL_ROWS) only
    when both do: every layout of x and of the residual is bit-exact (the launcher called directly:
    the op itself passes residuals channels_last). 70 channels: two reduction blocks, the second partial."""
    from tlcore.kernels.implicit_gemm import pixel_row_flags
    from tlcore.kernels.int8_conv import int8_conv2d

    c = make_case(2, 70, 5, 6, 24, 1, 1)
    ref = reference(c)
    c = on_device(dict(c, x=in_layout(c["x"], x_layout), residual=in_layout(c["residual"], residual_layout)),
                  device)
    out = torch.full(ref.shape, 85, dtype=torch.int8, device=device).contiguous(memory_format=torch.channels_last)
    flags = pixel_row_flags(c["x"], c["residual"], out, (1, 1), c["stride"], c["padding"])
    assert flags == {"X_PIXEL_ROWS": x_layout in ("channels_last", "later_images"),
                     "OUT_PIXEL_ROWS": residual_layout == "channels_last"}
    int8_conv2d(c["x"], c["x_zero"], c["weight"], c["multiplier"], c["offset"], c["shift"], c["residual"],
                c["res_multiplier"], c["out_zero"], c["relu"], c["stride"], c["padding"], c["dilation"], 127, out)
    assert_bit_exact(out.cpu(), ref, f"triton 1x1 x {x_layout}, residual {residual_layout}")


def channel_slice(t, extra):
    """t (N, C, H, W) as the first C channels of a channels_last tensor of C + extra channels (its
    pixels in row order, `extra` channels apart)."""
    return F.pad(t, (0, 0, 0, 0, 0, extra), value=99).contiguous(memory_format=torch.channels_last)[:, :t.shape[1]]


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 3), c=st.sampled_from([1, 5, 32, 64, 100, 256, 257]),
       hw=st.tuples(st.integers(1, 11), st.integers(1, 11)), k=st.integers(1, 70), residual=st.booleans(),
       relu=st.booleans(), layout=st.sampled_from(["channels_last", "channel_slices", "single_nchw"]),
       seed=st.integers(0, 2**16))
@example(n=3, c=64, hw=(7, 9), k=70, residual=True, relu=True, layout="channels_last", seed=1)  # 2 programs a way
@example(n=1, c=256, hw=(5, 5), k=67, residual=True, relu=False, layout="channel_slices", seed=2)  # widest
@example(n=1, c=100, hw=(6, 5), k=20, residual=False, relu=True, layout="single_nchw", seed=3)
def test_triton_pointwise_kernel_random_shapes(n, c, hw, k, residual, relu, layout, seed):
    """1x1 stride-1 convs whose tensors' pixels lie in row order, with up to POINTWISE_MAX_CHANNELS input
    channels, run the row-tile loop (_int8_pointwise_kernel; the interpreter's config runs 3 tiles of 32
    rows a program, so M past 96 spans programs and most last tiles are partial), one channel more the
    general kernel: both bit-exact, into a poisoned output. Layouts: channels_last; x, the residual and
    out as channel slices of wider tensors (pixel strides past C and K, each its own); a single NCHW
    image as x (channel stride H * W)."""
    from tlcore.kernels.int8_conv import POINTWISE_MAX_CHANNELS, int8_conv2d, pointwise_rows

    case = make_case(n, c, *hw, k, 1, 1, residual=residual, relu=relu, seed=seed)
    ref = reference(case)
    slices = layout == "channel_slices"
    if residual:  # channels_last, as the op passes it
        case["residual"] = channel_slice(case["residual"], 3) if slices else \
            case["residual"].contiguous(memory_format=torch.channels_last)
    if slices:
        case["x"] = channel_slice(case["x"], 1)
    elif layout == "single_nchw" and n == 1:
        case["x"] = case["x"].contiguous()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = on_device(case, device)
    out = torch.full(ref.shape, 85, dtype=torch.int8, device=device)
    out = channel_slice(out, 5) if slices else out.contiguous(memory_format=torch.channels_last)
    # (In batches of 1x1 images torch's channels_last strides of the size-1 dimensions may not give
    # the pixel stride, and then the general kernel runs: pixel_rows cannot tell.)
    if hw != (1, 1) or n == 1:
        assert pointwise_rows(case["x"], case["weight"], case["residual"], out, [1, 1], [0, 0], 1) == \
            (c <= POINTWISE_MAX_CHANNELS)
    int8_conv2d(case["x"], case["x_zero"], case["weight"], case["multiplier"], case["offset"], case["shift"],
                case["residual"], case["res_multiplier"], case["out_zero"], relu, [1, 1], [0, 0], [1, 1], 127, out)
    assert torch.equal(out.cpu(), ref), f"{(n, c, hw, k, residual, relu, layout, seed)}"


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 12), taps=st.integers(1, 7), stride=st.integers(1, 3), pad=st.integers(0, 4),
       dilation=st.integers(1, 3))
def test_border_lines_are_the_output_rows_with_taps_outside_the_image(size, taps, stride, pad, dilation):
    """The Triton int8 conv corrects its accumulator on exactly the output rows (columns) whose window
    reaches before the image (the first `top`) or past it (the last `bottom`): counted by brute force."""
    from tlcore.kernels.int8_border import border_lines

    assume(size + 2 * pad >= dilation * (taps - 1) + 1)
    out_size = (size + 2 * pad - dilation * (taps - 1) - 1) // stride + 1
    first = [i * stride - pad for i in range(out_size)]  # each output row's first input row
    before = [i for i in range(out_size) if first[i] < 0]
    past = [i for i in range(out_size) if first[i] + (taps - 1) * dilation >= size]
    top, bottom = border_lines(size, out_size, taps, stride, pad, dilation)
    assert before == list(range(top)) and past == list(range(out_size - bottom, out_size))


def test_pixel_rows_ignores_the_strides_of_single_images_and_rows():
    from tlcore.kernels.implicit_gemm import pixel_rows

    t = torch.zeros(1, 3, 1, 5).contiguous(memory_format=torch.channels_last)
    assert pixel_rows(t) and pixel_rows(t.as_strided(t.shape, (7, 1, 11, 3)))  # N = H = 1: only s_w counts
    assert not pixel_rows(torch.zeros(2, 3, 1, 5))  # NCHW: the next image is not 5 pixels on
    assert pixel_rows(torch.zeros(2, 1, 4, 5))  # one channel: NCHW is row order too


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernel_bit_exact_resnet_shapes_gpu():
    for case in [(8, 64, 56, 56, 64, 3, 3, 1, 1, 1), (8, 256, 14, 14, 1024, 1, 1, 1, 0, 1),
                 (4, 512, 7, 7, 512, 3, 3, 1, 1, 1), (4, 3, 224, 224, 64, 7, 7, 2, 3, 1)]:
        c = make_case(*case)
        ref = q8._int8_conv2d_torch(*[c[k] for k in ("x", "x_zero", "weight", "multiplier", "offset", "shift",
                                                      "residual", "res_multiplier", "out_zero", "relu", "stride",
                                                      "padding", "dilation")])
        c = on_device(c, "cuda")
        assert_bit_exact(run(c, "triton").cpu(), ref, f"triton gpu {case}")


# CASES, ResNet-like tiles, and deep reductions (C = 512, 3x3: K = 4608) over several 128-row
# m-tiles, a partial 64-channel n-tile and a strided window; flat (r, s, c) reductions (C < 16)
# over several m-tiles and 64-value steps; unequal dilations, flat and per tap.
CUDA_CASES = CASES + [(4, 64, 28, 28, 64, 3, 3, 1, 1, 1), (2, 256, 14, 14, 1024, 1, 1, 1, 0, 1),
                      (2, 512, 12, 12, 96, 3, 3, 1, 1, 1), (1, 512, 14, 14, 130, 3, 3, 2, 1, 1),
                      (2, 3, 32, 32, 64, 7, 7, 2, 3, 1), (1, 15, 9, 8, 20, 5, 5, 1, 2, 1),
                      (1, 5, 13, 12, 7, 3, 3, 1, (2, 1), (2, 1)), (1, 20, 11, 12, 9, 3, 2, (2, 1), (1, 2), (1, 2))]
needs_cuda_kernels = pytest.mark.skipif(not torch.cuda.is_available() or not _extension.has_cuda_kernels(),
                                        reason="needs a CUDA device and tlcore's CUDA kernels")


def cuda_kernels():
    """The CUDA kernels this device and build run: dp4a everywhere, and the mma.sync (IMMA) one
    where the launcher picks it by default (sm_80+ code for an sm_80+ device)."""
    return ["dp4a", "mma"] if torch.ops.tlcore._int8_cuda_kernel() == "mma" else ["dp4a"]


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: "x".join(map(str, c[:7])))
def test_cuda_kernel_bit_exact_and_equal_to_triton(case, monkeypatch):
    """Every CUDA kernel (dp4a, mma) equals the integer reference and the Triton kernel bit for bit."""
    for residual, relu in ((True, True), (False, False)):
        c = make_case(*case, residual=residual, relu=relu)
        ref = reference(c) if case[0] * case[2] * case[3] < 5000 else q8._int8_conv2d_torch(*_op_args(c)[:14])
        c = on_device(c, "cuda")
        triton_out = run(c, "triton")
        for kernel in cuda_kernels():
            monkeypatch.setenv(q8.CUDA_KERNEL_ENV, kernel)
            assert torch.ops.tlcore._int8_cuda_kernel() == kernel
            out = run(c, "cuda")
            assert_bit_exact(out.cpu(), ref, f"cuda {kernel} {case} residual={residual} relu={relu}")
            assert torch.equal(out, triton_out), f"cuda {kernel} {case}: differs from triton"
    monkeypatch.delenv(q8.CUDA_KERNEL_ENV)
    torch.library.opcheck(torch.ops.tlcore._int8_conv_cuda.default, _op_args(
        {k: v.contiguous(memory_format=torch.channels_last) if isinstance(v, torch.Tensor) and v.dim() == 4 else v
         for k, v in c.items()})[:14])


@pytest.mark.gpu
@needs_cuda_kernels
def test_cuda_kernel_choice(monkeypatch):
    """auto runs the tensor-core kernel from sm_80 on (the default build has sm_80+ code); a bad or
    impossible forced choice raises."""
    expected = "mma" if torch.cuda.get_device_capability()[0] >= 8 else "dp4a"
    monkeypatch.delenv(q8.CUDA_KERNEL_ENV, raising=False)
    assert torch.ops.tlcore._int8_cuda_kernel() == expected
    monkeypatch.setenv(q8.CUDA_KERNEL_ENV, "auto")
    assert torch.ops.tlcore._int8_cuda_kernel() == expected
    c = make_case(1, 5, 6, 6, 7, 3, 3, padding=1)
    c = on_device(c, "cuda")
    monkeypatch.setenv(q8.CUDA_KERNEL_ENV, "wmma")
    with pytest.raises((RuntimeError, ValueError), match="choose auto, dp4a or mma"):
        run(c, "cuda")
    if expected != "mma":  # (not cuda_kernels(): it reads the bad choice still set)
        monkeypatch.setenv(q8.CUDA_KERNEL_ENV, "mma")
        with pytest.raises((RuntimeError, ValueError), match="compute capability"):
            run(c, "cuda")


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("c", [3, 32])  # the flat (stem) reduction and the per-tap one
def test_cuda_kernel_padding_past_int32(c, monkeypatch):
    """Padding and dilation of 2**32 rows, past the mma kernel's int32 coordinates (the launcher runs
    such convs on dp4a), give the right codes: the one output row's second tap reads the image's
    only row and its first the padding, as in the same conv with padding and dilation 1."""
    huge, expected = padding_past_int32_case(c, 2**32)
    huge = on_device(huge, "cuda")
    for kernel in cuda_kernels():
        monkeypatch.setenv(q8.CUDA_KERNEL_ENV, kernel)
        assert_bit_exact(run(huge, "cuda").cpu(), expected, f"cuda {kernel}, C={c}, padding 2**32")


def test_each_launch_the_backend_chooser_times_gives_the_codes(monkeypatch, device):
    """The op hands backend.select_fastest a launcher for timing: run here on every backend this
    machine has, each call gives the reference's codes. The timing key tells apart what a kernel's
    speed depends on (batch, strides, residual, shift) and matches for an equal call."""
    from tlcore import backend

    names = ["triton", "torch"]
    if device.type == "cpu" and _extension.loaded():
        names.append("cpu")
    if device.type == "cuda" and _extension.has_cuda_kernels():
        names.append("cuda")
    launched = []

    def chooser(op, dev, implemented, key, launch):
        launched.append({name: launch(name).clone() for name in names})
        return "torch"

    monkeypatch.setattr(backend, "select_fastest", chooser)
    c = on_device(make_case(2, 21, 7, 9, 19, 3, 3, padding=1), device)
    variants = [c, dict(c, x=c["x"][:1], residual=c["residual"][:1]), dict(c, x=c["x"].contiguous()),
                dict(c, residual=None), dict(c, shift=c["shift"] - 1), c]
    keys = []
    for case in variants:
        out = run(case, None)
        for name, result in launched[-1].items():
            assert torch.equal(result, out), f"{name} launched for timing differs"
        keys.append(q8._timing_key(case["x"], case["weight"], case["residual"], case["shift"], case["relu"],
                                   case["stride"], case["padding"], case["dilation"], case["out_max"], 1))
    assert_bit_exact(out.cpu(), reference(on_device(c, "cpu")), "the chooser's backend")
    assert keys[0] == keys[-1] and len(set(keys)) == len(variants) - 1


def test_traced_calls_find_the_eager_timing_key():
    """torch.compile runs the op's body on fake (functional) tensors: the key of a call is the same
    there as in eager, so the choice measured eagerly applies; symbolic sizes give no key."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    c = make_case(2, 5, 6, 7, 3, 3, 3, padding=1)
    rest = (c["residual"], c["shift"], c["relu"], c["stride"], c["padding"], c["dilation"], c["out_max"], 1)
    eager = q8._timing_key(c["x"], c["weight"], *rest)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (c["x"], c["weight"], c["residual"])]
    assert q8._timing_key(fake[0], fake[1], fake[2], *rest[1:]) == eager
    mode = FakeTensorMode(shape_env=ShapeEnv())
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * 4)
    symbolic = mode.from_tensor(c["x"], symbolic_context=dynamic)
    assert q8._timing_key(symbolic, c["weight"], None, *rest[1:]) is None


@pytest.mark.gpu
@needs_cuda_kernels
def test_gpu_backend_timed_once_and_bit_exact(monkeypatch):
    """With no backend forced, a configuration's first call times Triton and CUDA C++ (neither fails)
    and keeps the faster; later calls time nothing, and either backend gives the reference's codes."""
    from tlcore import backend

    monkeypatch.delenv("TLCORE_BACKEND", raising=False)
    monkeypatch.delenv(backend.TIMING_ENV, raising=False)
    monkeypatch.setattr(backend, "_fastest", {})
    timed = []
    median_ms = backend._median_ms
    monkeypatch.setattr(backend, "_median_ms", lambda call, device: timed.append(call.args) or median_ms(call, device))
    c = make_case(2, 64, 14, 14, 96, 3, 3, padding=1)
    ref = reference(c)
    c = on_device(c, "cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_bit_exact(run(c, None).cpu(), ref, "timed gpu backend")
        assert_bit_exact(run(c, None).cpu(), ref, "timed gpu backend, second call")
    assert not [w for w in caught if "failed while timed" in str(w.message)]
    # (on sm_90 the Triton backend's first call also times its two kernels: tests/test_int8_conv_tma.py)
    assert sorted(t for t in timed if t[0] in backend.BACKENDS) == [("cuda",), ("triton",)]
    (entry, chosen), = [(e, name) for e, name in backend.fastest_choices().items() if e[0] == q8.CONV_OP]
    assert chosen in ("triton", "cuda")


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("chosen", ["triton", "cuda"])
def test_gpu_backend_choice_replays_in_a_cuda_graph(monkeypatch, chosen):
    """A measured choice, either one, holds while a CUDA graph is captured, and the replay gives the
    reference's codes, also after the weight changes in place (the graph computes the padding
    corrections from the weight's values when it replays: no launch plan made before brings its own)."""
    from tlcore import backend

    monkeypatch.delenv("TLCORE_BACKEND", raising=False)
    monkeypatch.delenv(backend.TIMING_ENV, raising=False)
    c = make_case(2, 64, 14, 14, 96, 3, 3, padding=1)
    ref = reference(c)
    c = on_device(c, "cuda")
    key = q8._timing_key(c["x"], c["weight"], c["residual"], c["shift"], c["relu"], c["stride"], c["padding"],
                         c["dilation"], c["out_max"], 1)
    monkeypatch.setattr(backend, "_fastest", {(q8.CONV_OP, c["x"].device, key): chosen})
    run(c, None)  # (compiles the kernel outside the capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(c, None)
    out.fill_(0x5A)
    graph.replay()
    assert_bit_exact(out.cpu(), ref, f"{chosen} replayed in a CUDA graph")
    assert backend.fastest_choices() == {(q8.CONV_OP, c["x"].device, key): chosen}
    with torch.no_grad():
        c["weight"].neg_()  # (weights lie in [-127, 127])
    out.fill_(0x5A)
    graph.replay()
    assert_bit_exact(out.cpu(), reference(on_device(c, "cpu")), f"{chosen} replayed after the weight changed")


def padding_past_int32_case(c, rows):
    """(a (1, c, 1, 5) image, 2x1 kernel, `rows` rows of padding and dilation: one output row; its
    expected codes, those of the same conv with padding and dilation 1)."""
    case = make_case(1, c, 1, 5, 8, 2, 1, stride=(4 * rows, 1), padding=(rows, 0), dilation=(rows, 1),
                     residual=False)
    return case, reference(dict(case, padding=[1, 0], dilation=[1, 1], stride=[1, 1]))[:, :, :1]


@pytest.mark.parametrize("c", [3, 32])
def test_large_padding_and_dilation(c):
    """The CPU kernel and the torch backend on 4096 rows of padding and dilation (the GPU test's
    2**32 would not fit the CPU kernel's padded copy of the input)."""
    large, expected = padding_past_int32_case(c, 2**12)
    for name in ("cpu", "torch"):
        assert_bit_exact(run(large, name), expected, f"{name}, C={c}, padding 4096")


def test_empty_batch():
    c = make_case(1, 4, 5, 5, 6, 3, 3)
    c["x"] = c["x"][:0]
    c["residual"] = c["residual"][:0]
    for name in ("cpu", "torch"):
        out = run(c, name)
        assert out.shape == (0, 6, 3, 3) and out.dtype == torch.int8


def test_zero_input_channels_give_the_requantized_offsets(device):
    """C = 0 is an empty sum: every output is the epilogue of acc = 0 (plus the residual). PyTorch's
    conv2d returns no output channels there, which the torch backend passed on as a shape error."""
    c = make_case(2, 4, 5, 5, 6, 3, 3, padding=1)
    c["x"] = c["x"][:, :0]
    c["weight"] = c["weight"][:, :0]
    acc = torch.zeros(2, 6, 5, 5, dtype=torch.int64)
    expected = q8.requantize_reference(acc, c["multiplier"], c["offset"], c["shift"], c["residual"],
                                       c["res_multiplier"], c["out_zero"], c["relu"], c["out_max"])
    assert expected.unique().numel() > 5  # the residual and the offsets make distinct codes
    for name in ("cpu", "torch"):
        out = run(c, name)
        assert out.shape == expected.shape and torch.equal(out, expected), name
    moved = on_device(c, device)
    assert torch.equal(run(moved, "triton").cpu(), expected)


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("change, error, match", [
    (dict(x=torch.zeros(1, 4, 5, 5)), TypeError, "must be int8"),
    (dict(weight=torch.zeros(6, 3, 3, 3, dtype=torch.int8)), ValueError, "4 channels but weight expects 3"),
    (dict(multiplier=torch.zeros(6, dtype=torch.int64)), ValueError, "multiplier must be int32"),
    (dict(offset=torch.zeros(5, dtype=torch.int64)), ValueError, "offset must be int64 of shape"),
    (dict(shift=63), ValueError, "shift must be in"),
    (dict(x_zero=128), ValueError, "x_zero must be in"),
    (dict(residual=torch.zeros(1, 6, 2, 2, dtype=torch.int8)), ValueError, "residual must be int8 of shape"),
    (dict(padding=[0, 0], x=torch.zeros(1, 4, 2, 2, dtype=torch.int8)), ValueError, "smaller than"),
    (dict(stride=[0, 1]), ValueError, "stride >= 1"),
    (dict(padding="same"), ValueError, "int8_conv2d: padding='same' is not supported; pass explicit integers"),
    (dict(dilation=(1, 1, 1)), ValueError, "int8_conv2d: dilation must be an int or a pair of ints"),
    (dict(x=torch.zeros(1, 4, 5, 5, dtype=torch.int8, device="meta")), ValueError,
     "x is on meta but weight on cpu, multiplier on cpu, offset on cpu, residual on cpu: put them on one device"),
])
def test_bad_arguments_raise(change, error, match):
    c = make_case(1, 4, 5, 5, 6, 3, 3, padding=1)
    c.update(change)
    for name in ("cpu", "torch"):
        with pytest.raises(error, match=match):
            run(c, name)


@pytest.mark.parametrize("offset", [-(2**62 + 2**50), 2**63 - 1])
def test_constants_past_the_epilogue_headroom_raise(offset):
    """Hand-made offsets near int64's end: the torch backend's int64 epilogue wrapped them into wrong
    codes where the C++ kernel refused them; both refuse them now."""
    c = make_case(1, 4, 5, 5, 6, 3, 3, padding=1)
    c["offset"] = torch.full((6,), offset, dtype=torch.int64)
    for name in ("cpu", "torch"):
        with pytest.raises(ValueError, match="2\\*\\*62"):
            run(c, name)


def test_too_long_reduction_raises():
    c = make_case(1, 4, 5, 5, 2, 3, 3, padding=1)
    c["x"] = torch.zeros(1, 14700, 3, 3, dtype=torch.int8)
    c["weight"] = torch.zeros(2, 14700, 3, 3, dtype=torch.int8)
    c["residual"] = None
    with pytest.raises(ValueError, match="int32 accumulation"):
        run(c, "torch")


@needs_extension
# The binding checks the arguments (RuntimeError), the kernel the headroom (ValueError), on every torch.
@pytest.mark.parametrize("change, error, match", [
    (dict(x=torch.zeros(1, 4, 2, 2, dtype=torch.int8), padding=[0, 0], residual=None), RuntimeError,
     "smaller than the"),
    (dict(padding=[-1, -1]), RuntimeError, "padding >= 0"),
    (dict(stride=[0, 1]), RuntimeError, "stride >= 1"),
    (dict(dilation=[1, 0]), RuntimeError, "dilation >= 1"),
    (dict(x_zero=128), RuntimeError, "x_zero and out_zero"),
    (dict(out_zero=-129, out_max=127), RuntimeError, "x_zero and out_zero"),
    (dict(res_multiplier=2**31), RuntimeError, "res_multiplier"),
    (dict(offset=torch.full((8,), -(2**62 + 2**50), dtype=torch.int64)), ValueError, "2\\*\\*62"),
])
def test_cpu_kernel_op_validates_its_arguments(change, error, match):
    """The C++ op, which Int8Conv2d calls directly on CPU, checks its arguments itself: clear errors,
    no crash (a negative padding used to write before the padded buffer, a zero stride to divide by 0)."""
    c = make_case(1, 4, 5, 5, 8, 3, 3, padding=1)
    c["weight"] = c["weight"].contiguous(memory_format=torch.channels_last)
    c["residual"] = c["residual"].contiguous(memory_format=torch.channels_last)
    c.update(change)
    c["x"] = c["x"].contiguous(memory_format=torch.channels_last)
    with pytest.raises(error, match=match):
        torch.ops.tlcore._int8_conv_cpu(*_op_args(c)[:14], None, 0, 0)


@needs_extension
def test_unsupported_isa_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(CPU_ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="TLCORE_INT8_CPU_ISA"):
        run(make_case(1, 4, 5, 5, 6, 3, 3), "cpu")
    lacking = next((isa for isa in TESTED_ISAS if not cpu_isa_supported(isa)), None)
    if lacking is not None:  # (a CPU with every instruction set has none to lack)
        monkeypatch.setenv(CPU_ISA_ENV, lacking)
        with pytest.raises(ValueError, match=f"TLCORE_INT8_CPU_ISA='{lacking}': this CPU has no {lacking}; it can run"):
            run(make_case(1, 4, 5, 5, 6, 3, 3), "cpu")
    for variable in (CPU_ISA_ENV, ALGORITHM_ENV):  # set but empty: as if unset
        monkeypatch.setenv(variable, "")
    c = make_case(*CASES[1])
    assert_bit_exact(run(c, "cpu"), reference(c), "empty settings")


# ---- opcheck --------------------------------------------------------------------------------

def _op_args(c, packed_weight=None):
    """tlcore::int8_conv2d's arguments; [:14] ends at out_max (the CUDA op), [:13] at dilation."""
    return (c["x"], c["x_zero"], c["weight"], c["multiplier"], c["offset"], c["shift"], c["residual"],
            c["res_multiplier"], c["out_zero"], c["relu"], c["stride"], c["padding"], c["dilation"], c["out_max"],
            c["x_max"], packed_weight)


@pytest.mark.parametrize("backend_name", ["cpu", "torch", "triton"])
def test_opcheck_int8_conv2d(backend_name, device):
    dev = device if backend_name == "triton" else torch.device("cpu")
    if backend_name == "cpu" and not _extension.loaded():
        pytest.skip("tlcore._C is not built")
    c = make_case(1, 5, 6, 6, 7, 3, 3, padding=1)
    args = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in _op_args(c)]
    with use_backend(backend_name):
        torch.library.opcheck(torch.ops.tlcore.int8_conv2d.default, args,
                              test_utils=opcheck_utils(backend_name, dev))


@needs_extension
def test_opcheck_cpu_kernel_op():
    c = make_case(1, 5, 6, 6, 7, 3, 3, padding=1)
    c["weight"] = c["weight"].contiguous(memory_format=torch.channels_last)  # the public op's job
    c["residual"] = c["residual"].contiguous(memory_format=torch.channels_last)
    scalar = CPU_ISAS["scalar"]
    for isa, algorithm in ((0, 0), (scalar, 0), (scalar, 1)):
        torch.library.opcheck(torch.ops.tlcore._int8_conv_cpu.default, (*_op_args(c)[:14], None, isa, algorithm))
        packed = torch.ops.tlcore._int8_pack_weight_cpu(c["weight"], isa, algorithm)
        torch.library.opcheck(torch.ops.tlcore._int8_conv_cpu.default, (*_op_args(c)[:14], packed, isa, algorithm))
        torch.library.opcheck(torch.ops.tlcore._int8_pack_weight_cpu.default, (c["weight"], isa, algorithm))
    for case, algorithm in (((1, 3, 9, 8, 7, 3, 5, 2, 1), "rows"),  # odd C, even C * stride
                            ((1, 6, 9, 8, 7, 3, 3, 2, 1), "winograd_stride2")):
        c = make_case(*case)
        c["weight"] = c["weight"].contiguous(memory_format=torch.channels_last)
        c["residual"] = c["residual"].contiguous(memory_format=torch.channels_last)
        code = CPU_ALGORITHMS[algorithm]
        packed = torch.ops.tlcore._int8_pack_weight_cpu(c["weight"], scalar, code)
        torch.library.opcheck(torch.ops.tlcore._int8_conv_cpu.default, (*_op_args(c)[:14], packed, scalar, code))
        torch.library.opcheck(torch.ops.tlcore._int8_pack_weight_cpu.default, (c["weight"], scalar, code))


def test_weights_of_minus_128_at_the_reduction_limit_stay_exact():
    """The op accepts any int8 weight: at C = MAX_REDUCTION, 128 * 128 products must not wrap."""
    c = q8.MAX_REDUCTION
    x = torch.full((1, c, 1, 1), -128, dtype=torch.int8)
    w = torch.full((1, c, 1, 1), -128, dtype=torch.int8)
    multiplier, offset = torch.ones(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int64)
    exact = (128 * 128 * c) >> 24  # the true sum, shifted: inside int8's range
    for name in ("torch", "cpu"):
        with use_backend(name):
            out = q8.int8_conv2d(x, 0, w, multiplier, offset, 24, out_zero=0)
        assert out.flatten().tolist() == [exact], name
