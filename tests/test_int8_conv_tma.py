"""The TMA-fed Triton int8 conv (kernels/int8_conv_tma.py): bit-exact against the integer reference,
which convs it takes, and how the op picks it."""
import warnings

import pytest
import torch
import triton

from markers import triton_kernels_or_skip
from test_int8_ops import assert_bit_exact, in_layout, make_case, on_device, reference, run
from tlcore.ops import int8 as q8

with triton_kernels_or_skip():
    T = pytest.importorskip("tlcore.kernels.int8_conv_tma")
if T.TensorDescriptor is None:
    pytest.skip("this Triton has no tensor descriptors (the op runs the general kernel)", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
    pytest.skip("the TMA kernel needs compute capability 9.0+", allow_module_level=True)

CASES = [  # n, c, h, w, k, r, s, stride, padding, dilation
    (2, 32, 9, 11, 48, 3, 3, 1, 1, 1),      # partial boxes in both directions
    (1, 16, 7, 7, 16, 3, 3, 1, 1, 1),       # batch 1, a 7x7 map
    (1, 48, 10, 9, 80, 3, 3, 1, 2, 2),      # dilation; two channel tiles, the second partial
    (2, 32, 9, 11, 48, 3, 3, 1, (1, 2), (1, 2)),  # dilation and padding differing by direction
    (3, 16, 5, 5, 16, 1, 3, 1, (0, 1), 1),  # asymmetric kernel and padding
    (2, 32, 6, 5, 16, 3, 3, 1, 0, 1),       # unpadded 3x3
    (2, 16, 6, 7, 32, 5, 5, 1, 2, 1),       # 5x5
    (2, 64, 5, 6, 80, 1, 1, 1, 0, 1),       # pointwise: pixel rows
    (1, 512, 3, 3, 32, 3, 3, 1, 1, 1),      # K = 3*3*512 = 4608, the deepest ResNet reduction
    (3, 32, 1, 1, 16, 1, 1, 1, 0, 1),       # 1x1 images: torch's channels_last strides of H and W are 1
    (2, 32, 1, 1, 16, 3, 3, 1, 1, 1),       # ... and a padded conv on them (the image grid, not pixel rows)
    (2, 128, 8, 10, 48, 3, 3, 2, 1, 1),     # stride 2: x as pairs of rows and of pixels; odd output width
    (1, 128, 6, 6, 64, 1, 1, 2, 0, 1),      # a downsampling 1x1
    (2, 128, 10, 8, 16, 3, 3, 2, 2, 2),     # stride 2, dilation 2: every tap on an even offset
    (2, 256, 8, 6, 32, 5, 5, 2, 2, 1),      # 5x5 stride 2: taps two pairs away
    (1, 3, 17, 19, 16, 7, 7, 2, 3, 1),      # the RGB stem (space-to-depth), odd sizes
    (2, 3, 12, 12, 32, 7, 7, 2, 3, 1),      # ... even sizes, 2 images
    (2, 1, 10, 11, 16, 5, 5, 2, 2, 1),      # one channel, 5x5
    (1, 8, 6, 6, 16, 1, 1, 2, 0, 1),        # STEM_CHANNELS, 1x1
    (1, 80, 6, 7, 32, 3, 3, 1, 1, 1),       # two channel steps a tap, the second partial (its box reaches the next tap)
    (2, 160, 5, 6, 80, 1, 1, 1, 0, 1),      # pointwise over three channel steps, the last partial
]


def launch_tma(case, out):
    T.int8_conv2d_tma(case["x"], case["x_zero"], case["weight"].contiguous(memory_format=torch.channels_last),
                      case["multiplier"], case["offset"], case["shift"], case["residual"], case["res_multiplier"],
                      case["out_zero"], case["relu"], case["stride"], case["padding"], case["dilation"], 127, out)


def nhwc_case(*shape, **kwargs):
    """make_case's operands on DEVICE with the residual channels_last, as the op passes it."""
    case = make_case(*shape, **kwargs)
    if case["residual"] is not None:
        case["residual"] = case["residual"].contiguous(memory_format=torch.channels_last)
    return case


def poisoned(ref, value):
    return torch.full(ref.shape, value, dtype=torch.int8, device=DEVICE).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:7])))
def test_tma_kernel_bit_exact(case):
    """Every output of the launcher, into outputs poisoned two ways, equals the integer reference's."""
    c = nhwc_case(*case, residual=case[0] != 3, relu=case[1] != 48)
    ref = reference(c)
    c = on_device(c, DEVICE)
    for poison in (85, -42):
        out = poisoned(ref, poison)
        assert T.tma_applies(c["x"], c["weight"].contiguous(memory_format=torch.channels_last), c["residual"], out,
                             c["stride"], c["dilation"], 1)
        launch_tma(c, out)
        assert_bit_exact(out.cpu(), ref, f"tma {case}")


def one_config_kernel(monkeypatch, name, **meta):
    """Replace the module's autotuned kernel `name` by one with a single config of these meta-parameters
    (the interpreter's config is one shape; these are the GPU's other box shapes)."""
    kernel = triton.autotune(configs=[triton.Config(meta, num_warps=4, num_stages=3, pre_hook=T._set_box_shapes)],
                             key=T._KEY)(T._int8_conv_tma_body)
    monkeypatch.setattr(T, name, kernel)


@pytest.mark.parametrize("meta", [
    dict(BLOCK_N=64, TILE_N=2, TILE_H=4, TILE_W=4, BLOCK_K=64),   # boxes across images; channels past C in a step
    dict(BLOCK_N=128, TILE_N=1, TILE_H=8, TILE_W=8, BLOCK_K=32),  # a channel tile wider than K
    dict(BLOCK_N=64, TILE_N=4, TILE_H=2, TILE_W=2, BLOCK_K=32),   # more images than the batch in a box
], ids=["2x4x4", "128-channels", "4x2x2"])
def test_tma_kernel_box_shapes(meta, monkeypatch):
    """Padded convs on GPU box shapes: the border classes of pixels past the images (rows, columns and
    images of a box that hang over) read no table entry, and their outputs are clipped."""
    one_config_kernel(monkeypatch, "_int8_conv_tma_kernel", **meta)
    c = nhwc_case(3, 32, 7, 6, 48, 3, 3, padding=1)
    ref = reference(c)
    c = on_device(c, DEVICE)
    out = poisoned(ref, 85)
    launch_tma(c, out)
    assert_bit_exact(out.cpu(), ref, f"tma boxes {meta}")


@pytest.mark.parametrize("layout", ["later_images", "lower_rows", "right_columns"])
def test_tma_kernel_on_views(layout):
    """A 1x1 conv on x as a view into a bigger NHWC tensor: with its pixels in row order (later images)
    as one row of pixels, else (a slice of rows or columns) as an image grid with x's own strides."""
    c = nhwc_case(2, 32, 5, 6, 16, 1, 1)
    ref = reference(c)
    c = on_device(dict(c, x=in_layout(c["x"], layout)), DEVICE)
    out = poisoned(ref, 85)
    launch_tma(c, out)
    assert_bit_exact(out.cpu(), ref, f"tma 1x1 on x {layout}")


def test_tma_applies_only_where_boxes_fit():
    """The TMA kernel takes ungrouped convs whose tensors are NHWC with 16-byte aligned strides, of
    stride 1, or of stride 2 where x's rows and pixels pair up and a channel box stays in its pixel, and
    stride-2 convs of a few channels (the stem, space-to-depth); the launcher refuses the rest with a
    ValueError rather than read through a wrong box."""
    c = on_device(nhwc_case(2, 32, 6, 6, 16, 3, 3, padding=1), DEVICE)
    x, weight, res = c["x"], c["weight"].contiguous(memory_format=torch.channels_last), c["residual"]
    out = torch.empty(2, 16, 6, 6, dtype=torch.int8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    assert T.tma_applies(x, weight, res, out, (1, 1), (1, 1), 1)
    wide = torch.zeros(2, 40, 6, 6, dtype=torch.int8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    x128 = torch.zeros(2, 128, 6, 6, dtype=torch.int8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w128 = torch.zeros(16, 128, 3, 3, dtype=torch.int8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    out2 = out[:, :, :3, :3]
    out24 = torch.empty(2, 24, 6, 6, dtype=torch.int8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    assert T.tma_applies(x128, w128, None, out2, (2, 2), (1, 1), 1)
    rgb = torch.zeros(2, 3, 6, 6, dtype=torch.int8, device=DEVICE)  # (NCHW: space_to_depth_operands copies)
    w_rgb = torch.zeros(16, 3, 3, 3, dtype=torch.int8, device=DEVICE)
    assert T.tma_applies(rgb, w_rgb, None, out2, (2, 2), (1, 1), 1)
    refused = {
        "stride 3": (x, weight, res, out, (3, 3), (1, 1), 1),
        "stride (1, 2)": (x, weight, res, out, (1, 2), (1, 1), 1),
        "stride 2 on 32 channels": (x, weight, None, out2, (2, 2), (1, 1), 1),
        "stride 2 on odd rows": (x128[:, :, :5], w128, None, out2, (2, 2), (1, 1), 1),
        "stride 2 on odd columns": (x128[..., :5], w128, None, out2, (2, 2), (1, 1), 1),
        "stride 2, pixels 256 channels apart":
            (torch.cat([x128, x128], 1)[:, :128], w128, None, out2, (2, 2), (1, 1), 1),
        "groups": (x, weight, res, out, (1, 1), (1, 1), 2),
        "NCHW x": (x.contiguous(), weight, res, out, (1, 1), (1, 1), 1),
        "NCHW weight": (x, weight.contiguous(), res, out, (1, 1), (1, 1), 1),
        "NCHW residual": (x, weight, res.contiguous(), out, (1, 1), (1, 1), 1),
        "x's pixels 40 bytes apart": (wide[:, :32], weight, res, out, (1, 1), (1, 1), 1),
        "8 channels": (x[:, :8], weight[:, :8], res, out, (1, 1), (1, 1), 1),
        "24 output channels": (x, weight, None, out24, (1, 1), (1, 1), 1),
        "a base 8 bytes past alignment": (torch.cat([x, x], 1)[:, 8:40], weight, res, out, (1, 1), (1, 1), 1),
        "an expanded x": (x[:1].expand(2, -1, -1, -1), weight, res, out, (1, 1), (1, 1), 1),
        "a stem with dilation": (rgb, w_rgb, None, out2, (2, 2), (2, 2), 1),
        "12 channels at stride 2": (wide[:, :12], weight[:, :12], None, out2, (2, 2), (1, 1), 1),
    }
    for what, args in refused.items():
        assert not T.tma_applies(*args), what
    with pytest.raises(ValueError, match="TMA kernel does not take"):
        T.int8_conv2d_tma(x, c["x_zero"], weight, c["multiplier"], c["offset"], c["shift"], res, c["res_multiplier"],
                          c["out_zero"], True, (2, 2), (1, 1), (1, 1), 127, out)


@pytest.mark.parametrize("forced", ["tma", "pointers"])
def test_op_runs_the_forced_triton_kernel(forced, monkeypatch):
    """TLCORE_INT8_TRITON_KERNEL picks the Triton backend's kernel where it applies (twice: the second
    call launches the tuned config directly, with its boxes set), and the general one elsewhere."""
    calls = []
    launch = T.Int8ConvTmaLaunch.__call__
    monkeypatch.setattr(T.Int8ConvTmaLaunch, "__call__", lambda *a: calls.append(1) or launch(*a))
    monkeypatch.setenv(q8.TRITON_KERNEL_ENV, forced)
    for case, applies in [((2, 32, 7, 9, 48, 3, 3, 1, 1, 1), True), ((2, 16, 9, 9, 16, 3, 3, 2, 1, 1), False)]:
        c = make_case(*case)
        ref = reference(c)
        c = on_device(c, DEVICE)
        for _ in range(2):
            assert_bit_exact(run(c, "triton").cpu(), ref, f"{forced} {case}")
        assert len(calls) == (2 if forced == "tma" else 0), case
    monkeypatch.setenv(q8.TRITON_KERNEL_ENV, "wgmma")
    with pytest.raises(ValueError, match="choose pointers or tma"):
        run(c, "triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_triton_kernel_timed_once_per_call_configuration(monkeypatch):
    """Unforced on sm_90, a call configuration's first Triton call times both kernels (neither fails:
    the TMA kernel's codes equal the pointer kernels') and keeps the faster; a second call times
    nothing. Both kernels, and the choice, give the reference's codes on ResNet-50 shapes."""
    from tlcore import backend

    monkeypatch.delenv(q8.TRITON_KERNEL_ENV, raising=False)
    monkeypatch.delenv(backend.TIMING_ENV, raising=False)
    monkeypatch.setattr(backend, "_fastest", {})
    timed = []
    median_ms = backend._median_ms
    monkeypatch.setattr(backend, "_median_ms", lambda call, device: timed.append(1) or median_ms(call, device))
    shapes = [(8, 64, 56, 56, 64, 3, 3, 1, 1, 1), (8, 256, 14, 14, 1024, 1, 1, 1, 0, 1),
              (4, 512, 7, 7, 512, 3, 3, 1, 1, 1), (8, 128, 28, 28, 128, 3, 3, 1, 1, 1),
              (8, 256, 28, 28, 256, 3, 3, 2, 1, 1), (8, 512, 28, 28, 1024, 1, 1, 2, 0, 1)]
    for shape in shapes:
        c = make_case(*shape)
        ref = reference(c)
        c = on_device(c, "cuda")
        for kernel in ("tma", "pointers"):
            monkeypatch.setenv(q8.TRITON_KERNEL_ENV, kernel)
            assert_bit_exact(run(c, "triton").cpu(), ref, f"{kernel} {shape}")
        monkeypatch.delenv(q8.TRITON_KERNEL_ENV)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert_bit_exact(run(c, "triton").cpu(), ref, f"timed {shape}")
            timings = len(timed)
            assert_bit_exact(run(c, "triton").cpu(), ref, f"chosen {shape}")
        assert not [w for w in caught if "failed while timed" in str(w.message)]
        assert len(timed) == timings > 0, shape
    choices = [name for entry, name in backend.fastest_choices().items() if entry[0] == q8.TRITON_CONV_KERNEL]
    assert len(choices) == len(shapes) and set(choices) <= {"tma", "pointers"}, choices


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_tma_kernel_that_disagrees_is_not_chosen(monkeypatch):
    """Before it is timed, the TMA kernel's codes are compared with the pointer kernels': one wrong code
    and it is no candidate, with a warning, and the call's codes are right."""
    from tlcore import backend

    monkeypatch.delenv(q8.TRITON_KERNEL_ENV, raising=False)
    monkeypatch.delenv(backend.TIMING_ENV, raising=False)
    monkeypatch.setattr(backend, "_fastest", {})
    monkeypatch.setattr(backend, "_warned", set())
    launch = T.Int8ConvTmaLaunch.__call__

    def off_by_one(self, x, weight, multiplier, offset, residual, out):
        launch(self, x, weight, multiplier, offset, residual, out)
        out.view(-1)[0] += 1

    monkeypatch.setattr(T.Int8ConvTmaLaunch, "__call__", off_by_one)
    c = make_case(8, 64, 14, 14, 64, 3, 3, padding=1)
    ref = reference(c)
    with pytest.warns(UserWarning, match="tma kernel failed while timed.*differ from the pointer kernels"):
        assert_bit_exact(run(on_device(c, "cuda"), "triton").cpu(), ref, "after a wrong TMA kernel")
    choices = [name for entry, name in backend.fastest_choices().items() if entry[0] == q8.TRITON_CONV_KERNEL]
    assert choices == ["pointers"]


def test_autotuner_times_only_the_least_wasteful_configs(monkeypatch):
    """The TMA kernels' early prune (on GPUs, where they autotune over every config) keeps the configs
    within USEFUL_SHARE_KEPT of the least wasteful: 64-channel convs get no 128-channel tiles or
    reduction blocks, 7x7 maps no 4x32 boxes; 28x28 maps of 128 channels keep them all."""
    # (interpreted, or with TLCORE_AUTOTUNE=0 as in GPU test runs, the kernels have a single config)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("TLCORE_AUTOTUNE", raising=False)
    spatial, rows = T._configs(pointwise=False), T._configs(pointwise=True)
    assert len(spatial) > 1 and len(rows) > 1

    def kept(configs, **args):
        names = ("BLOCK_N", "TILE_N", "TILE_H", "TILE_W", "BLOCK_K")
        kept = T._prune_wasteful(configs, args)
        assert kept and set(map(id, kept)) <= set(map(id, configs))
        best = max(configs, key=lambda config: T.useful_share(config, args))
        assert best in kept
        return [tuple(config.kwargs[name] for name in names) for config in kept]

    first_stage = kept(spatial, N=8, OH=56, OW=56, K=64, C=64)
    assert (64, 1, 8, 8, 64) in first_stage and all(n == 64 and k == 64 for n, _, _, _, k in first_stage)
    assert all(n == 64 and k == 64 for n, _, _, _, k in kept(rows, N=1, OH=1, OW=8 * 56 * 56, K=64, C=64))
    assert all((h, w) != (4, 32) for _, _, h, w, _ in kept(spatial, N=8, OH=7, OW=7, K=512, C=512))
    assert len(kept(spatial, N=8, OH=28, OW=28, K=128, C=128)) == len(spatial)
    for kernel in (T._int8_conv_tma_kernel, T._int8_pointwise_tma_kernel):
        assert kernel.early_config_prune is T._prune_wasteful
