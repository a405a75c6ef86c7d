"""Grouped int8 convs (ResNeXt's grouped 3x3): every backend bit-exact against the int64 reference."""
import pytest
import torch
import torch.nn.functional as F

from hypothesis import example, given, settings
from hypothesis import strategies as st

from numerics import opcheck_utils
from test_int8_ops import (SPLIT_CODES, assert_bit_exact, int64_conv, isa_or_skip, make_case, needs_extension,
                           on_device, reference, run, run_split, seven_bit, with_codes)
from tlcore import _extension
from tlcore.backend import use_backend
from tlcore.ops import int8 as q8
from tlcore.ops.int8_cpu import ALGORITHM_ENV, CPU_ALGORITHMS, CPU_ISA_ENV, CPU_ISAS, cpu_algorithm

GROUPED_CASES = [  # n, c, h, w, k, r, s, stride, padding, dilation, groups
    (2, 32, 9, 11, 32, 3, 3, 1, 1, 1, 8),     # ResNeXt-50's first stage: 4 channels a group
    (1, 64, 7, 7, 64, 3, 3, 2, 1, 1, 4),      # 16 a group (one 16-channel block each), strided
    (2, 15, 6, 7, 10, 3, 3, 1, 1, 1, 5),      # 3 input channels a group: windows off the 2/4-channel words
    (1, 48, 5, 5, 72, 1, 1, 1, 0, 1, 3),      # 24 outputs a group: blocks that straddle two groups
    (1, 128, 5, 4, 128, 3, 3, 1, 1, 1, 32),   # 32 groups, 4 channels each (ResNeXt-50's width)
    (1, 24, 6, 6, 48, 3, 3, 1, 2, 2, 24),     # depthwise-style: one input channel a group, dilated
    (2, 64, 7, 9, 64, 3, 3, 2, 1, 1, 8),      # 8 channels a group (ResNeXt-50's second stage), strided
    (1, 48, 5, 7, 48, 1, 1, 1, 0, 1, 6),      # 8 channels a group, pointwise
    (1, 160, 4, 5, 160, 3, 3, 1, 1, 1, 4),    # 40 a group: a tile of 64 columns from 64 on spans 3 groups
    (1, 64, 6, 5, 64, 3, 3, 1, 1, 1, 2),      # 32 a group: the split codes on AVX2
    (1, 160, 5, 5, 160, 1, 1, 1, 0, 1, 4),    # 40 a group, pointwise: a tile's 120-channel span in two blocks
]
GROUPED_IDS = ["x".join(map(str, c[:7])) + f"-g{c[10]}" for c in GROUPED_CASES]


def grouped_case(case, **kwargs):
    *shape, groups = case
    return make_case(*shape, groups=groups, **kwargs)


def test_int64_reference_is_torch_grouped_conv():
    """The grouped int64 reference agrees with torch's grouped conv (float64 holds these sums exactly)."""
    for case in GROUPED_CASES[2], GROUPED_CASES[5]:
        c = grouped_case(case)
        (ph, pw), groups = c["padding"], c["groups"]
        xp = F.pad(c["x"].double(), (pw, pw, ph, ph), value=float(c["x_zero"]))
        acc = F.conv2d(xp, c["weight"].double(), stride=c["stride"], dilation=c["dilation"], groups=groups)
        assert torch.equal(int64_conv(c["x"], c["x_zero"], c["weight"], c["stride"], c["padding"], c["dilation"],
                                      groups), acc.to(torch.int64))


@pytest.mark.parametrize("case", GROUPED_CASES, ids=GROUPED_IDS)
def test_torch_backend_bit_exact(case):
    c = grouped_case(case)
    assert_bit_exact(run(c, "torch"), reference(c), f"torch {case}")


@needs_extension
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avxvnni", "avx512vnni", "amx"])
@pytest.mark.parametrize("case", GROUPED_CASES, ids=GROUPED_IDS)
def test_cpu_kernel_bit_exact(case, isa, monkeypatch):
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
    for residual, relu, layout in ((True, True, "channels_last"), (False, False, "strided")):
        c = grouped_case(case, residual=residual, relu=relu, layout=layout)
        ref = reference(c)
        assert_bit_exact(run(c, "cpu"), ref, f"cpu/{isa} {case} residual={residual}")
        packed = q8.pack_weight_cpu(c["weight"], c["stride"], c["dilation"], groups=c["groups"])
        assert_bit_exact(run(dict(c, packed_weight=packed), "cpu"), ref, f"cpu/{isa} prepacked {case}")


@needs_extension
@pytest.mark.parametrize("case", GROUPED_CASES, ids=GROUPED_IDS)
def test_cpu_kernel_seven_bit_bit_exact(case, monkeypatch):
    """AVX2's vpmaddubsw kernel on 7-bit inputs (tlcore.quantize(reduce_range=True))."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip("avx2u7"))
    c = seven_bit(grouped_case(case))
    assert_bit_exact(run(c, "cpu"), reference(c), f"cpu/avx2u7 {case}")


@needs_extension
@pytest.mark.parametrize("codes", SPLIT_CODES)
@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 2), c_group=st.sampled_from([16, 32, 48, 64]), k_group=st.sampled_from([16, 32, 48]),
       groups=st.integers(2, 4), hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       rs=st.tuples(st.integers(1, 3), st.integers(1, 3)), stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), residual=st.booleans(), relu=st.booleans(),
       seed=st.integers(0, 2**16), reduce_range=st.booleans())
# 162 output pixels: top sums chunk by chunk
@example(n=2, c_group=16, k_group=32, groups=3, hw=(9, 9), rs=(3, 3), stride=(1, 1), padding=(1, 1),
         dilation=(1, 1), residual=True, relu=True, seed=3, reduce_range=False)
# ResNeXt-50's layer4 at batch 1: weights past the kernel's L2 budget and 2 chunks, so every output pixel's
# top sums come first
@example(n=1, c_group=32, k_group=32, groups=32, hw=(7, 7), rs=(3, 3), stride=(1, 1), padding=(1, 1),
         dilation=(1, 1), residual=True, relu=True, seed=4, reduce_range=False)
def test_cpu_split_grouped_bit_exact(codes, n, c_group, k_group, groups, hw, rs, stride, padding, dilation, residual,
                                     relu, seed, reduce_range):
    """Grouped convs on the split algorithm (AVX2): the padded input converted once (its pixels' listed
    channels kept with their groups, one rule for the whole input, decided on its first row), each block reading
    its own group's codes at each tap, and each output pixel's top sums gathered from its taps' lists and
    added to its own group's outputs only. Equal to the reference for 2-4 groups of 16-64 input and 16-48
    output channels, 1x1 to 3x3 kernels with stride, padding (x_zero's codes listed too) and dilation (each
    its own along height and width), inputs with few, half or all codes >= 0, and 7-bit codes; and ResNeXt-50's
    layer4 at batch 1, whose top sums are made for all output pixels first."""
    (h, w), (r, s) = hw, rs
    if h + 2 * padding[0] < dilation[0] * (r - 1) + 1 or w + 2 * padding[1] < dilation[1] * (s - 1) + 1:
        return
    case = make_case(n, c_group * groups, h, w, k_group * groups, r, s, stride, padding, dilation, residual, relu, seed,
                     groups=groups)
    case = with_codes(case, codes, seed)
    if reduce_range:
        case = dict(case, x=case["x"].clamp(max=-1), x_zero=min(case["x_zero"], -1), x_max=-1)
    isa = CPU_ISAS[isa_or_skip("avx2u7" if reduce_range else "avx2")]
    assert torch.equal(run_split(case, isa), reference(case)), (n, c_group, k_group, groups, h, w, r, s, stride)


@needs_extension
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avxvnni", "avx512vnni", "amx"])
@pytest.mark.parametrize("k, groups", [(96, 4), (64, 16)], ids=["wide-groups", "narrow-groups"])
def test_cpu_kernel_batch_of_many_chunks(k, groups, isa, monkeypatch):
    """A grouped 1x1 conv whose tasks convert their own rows (pointwise, many chunks a thread)."""
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip(isa))
    c = make_case(3, 64, 17, 19, k, 1, 1, groups=groups)
    assert_bit_exact(run(c, "cpu"), reference(c), f"cpu/{isa} pointwise, {groups} groups")


@needs_extension
@pytest.mark.parametrize("channels", [4, 8])
@pytest.mark.parametrize("isa", ["avx2", "avx512vnni"])
def test_narrow_groups_pack_only_their_own_channels(channels, isa):
    """4 or 8 channels a group, in and out: each output channel's packed weights hold its own group's
    channels only (the narrow kernels), not its 16-channel block's whole window."""
    k = c = 128
    words_a_group = channels // (2 if isa == "avx2" else 4)  # int16 pairs, or quads of bytes
    header, correction = 16, 0 if isa == "avx2" else k     # quads keep 128 * sum(w) per channel
    want = header + (k // 16) * 9 * words_a_group * 16 + correction
    packed = torch.ops.tlcore._int8_cpu_packed_words(k, c, 3, 3, CPU_ISAS[isa_or_skip(isa)], 0, c // channels)
    assert packed == want


@needs_extension
@pytest.mark.parametrize("first_rows", ["sparse", "dense"])
def test_cpu_split_grouped_one_rule_for_mixed_rows(first_rows):
    """A grouped conv's input takes one rule, chosen on its first image row: sparse first rows (post-ReLU-like
    codes) keep the lanes of 4 for the dense rest too, which then lists most channels, and dense first rows
    put the sparse rest on vpmaddubsw's pairs. Exact either way."""
    isa = CPU_ISAS[isa_or_skip("avx2")]
    case = make_case(2, 64, 9, 8, 64, 3, 3, padding=1, residual=True, relu=True, seed=9, groups=2)
    g = torch.Generator().manual_seed(9)
    dense = SPLIT_CODES["uniform"](g, case["x"].shape)
    sparse = (torch.randn(case["x"].shape, generator=g).abs() * 40).round().clamp(max=255) - 128
    top = torch.arange(9).view(1, 1, 9, 1) < 4
    x = torch.where(top, sparse, dense) if first_rows == "sparse" else torch.where(top, dense, sparse)
    case = dict(case, x=x.to(torch.int8).contiguous(memory_format=torch.channels_last))
    assert torch.equal(run_split(case, isa), reference(case))


@needs_extension
@pytest.mark.parametrize("c_group, k_group", [(24, 32), (32, 24), (8, 32)])
def test_cpu_split_refuses_groups_off_its_lanes(c_group, k_group):
    """The split needs each group's input channels in runs of 16 codes and its outputs in whole blocks of 16;
    other grouped convs are refused, not run wrong."""
    weight = torch.zeros(4 * k_group, c_group, 3, 3, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="no packing of this algorithm"):
        torch.ops.tlcore._int8_pack_weight_cpu(weight, CPU_ISAS[isa_or_skip("avx2")], CPU_ALGORITHMS["split"], 4)


@needs_extension
def test_cpu_split_chosen_for_grouped_convs_where_measured_faster(monkeypatch):
    """On AVX2 the split algorithm runs ResNeXt's grouped 3x3 convs of 32 or 64 channels a group (any
    stride), and of 16 on 7-bit codes: there it measured faster than direct. Groups of 16 on 8-bit codes
    and the narrow groups of 4 and 8 stay direct."""
    monkeypatch.delenv(ALGORITHM_ENV, raising=False)
    avx2, avx2u7 = CPU_ISAS[isa_or_skip("avx2")], CPU_ISAS[isa_or_skip("avx2u7")]
    split, direct = CPU_ALGORITHMS["split"], CPU_ALGORITHMS["direct"]

    def choice(c_group, isa, stride=1):
        return cpu_algorithm((32 * c_group, c_group, 3, 3), [stride, stride], [1, 1], isa, groups=32)

    assert [choice(32, avx2), choice(64, avx2), choice(32, avx2, stride=2), choice(16, avx2u7)] == [split] * 4
    assert [choice(16, avx2), choice(8, avx2u7), choice(4, avx2)] == [direct] * 3


@pytest.mark.parametrize("case", [GROUPED_CASES[i] for i in (0, 2, 3, 8)], ids=str)
def test_triton_kernel_bit_exact(device, case):
    c = grouped_case(case)
    ref = reference(c)
    c = on_device(c, device)
    assert_bit_exact(run(c, "triton").cpu(), ref, f"triton {case}")


def test_cuda_backend_falls_back_with_a_warning():
    """The CUDA C++ kernel has no grouped convs: forcing it warns and runs the default backend."""
    c = grouped_case(GROUPED_CASES[0])
    with use_backend("cuda"), pytest.warns(UserWarning, match="has no cuda kernel"):
        out = q8.int8_conv2d(c["x"], c["x_zero"], c["weight"], c["multiplier"], c["offset"], c["shift"],
                             residual=c["residual"], res_multiplier=c["res_multiplier"], out_zero=c["out_zero"],
                             relu=True, padding=1, groups=8)
    assert torch.equal(out, reference(c))


@pytest.mark.parametrize("groups, match", [(3, "positive divisor"), (0, "positive divisor"),
                                           (4, "per group x 4 groups")])
def test_bad_groups_raise(groups, match):
    c = grouped_case(GROUPED_CASES[0])  # 32 -> 32 channels in 8 groups
    for name in ("cpu", "torch"):
        with pytest.raises(ValueError, match=match):
            run(dict(c, groups=groups), name)


@needs_extension
def test_packed_weight_of_other_groups_is_refused(monkeypatch):
    monkeypatch.setenv(CPU_ISA_ENV, isa_or_skip("avx2"))
    c = grouped_case(GROUPED_CASES[0])  # weight (32, 4, 3, 3): also the 1-group weight of a 4-channel input
    ungrouped = q8.pack_weight_cpu(c["weight"], c["stride"], c["dilation"])
    with pytest.raises(RuntimeError, match="packed_weight does not match"):  # (its size differs)
        run(dict(c, packed_weight=ungrouped), "cpu")


@pytest.mark.parametrize("backend_name", ["cpu", "torch", "triton"])
def test_opcheck(backend_name, device):
    if backend_name == "cpu" and not _extension.loaded():
        pytest.skip("tlcore._C is not built")
    dev = device if backend_name == "triton" else torch.device("cpu")
    c = grouped_case((1, 12, 5, 5, 8, 3, 3, 1, 1, 1, 4))
    args = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in (
        c["x"], c["x_zero"], c["weight"], c["multiplier"], c["offset"], c["shift"], c["residual"],
        c["res_multiplier"], c["out_zero"], c["relu"], c["stride"], c["padding"], c["dilation"], c["out_max"],
        c["x_max"], None, 4)]
    with use_backend(backend_name):
        torch.library.opcheck(torch.ops.tlcore.int8_conv2d.default, args, test_utils=opcheck_utils(backend_name, dev))
