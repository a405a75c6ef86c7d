"""Bit-identical results: across backends, runs, a save/resume, and DDP replicas."""
import copy
import io
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch._dynamo.testing
import torch.multiprocessing as mp

import tlcore
from tlcore import _extension
from tlcore.backend import use_backend

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
OPTIMIZERS = {
    "adamw": lambda params, **kw: tlcore.optim.AdamW(params, lr=1e-2, weight_decay=0.05, **kw),
    "sgd": lambda params, **kw: tlcore.optim.SGD(params, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01,
                                                 **kw),
}


def _params(dtype):
    """Odd sizes, more than one Triton chunk (8192 elements interpreted, 65536 compiled), a
    channels_last weight and values down to fp16 subnormals."""
    torch.manual_seed(0)
    shapes = [(37,), (5, 7, 3), (70_001 if torch.cuda.is_available() else 10_001,), (1,)]
    params = [torch.randn(s) for s in shapes]
    params[1] = params[1] * 1e-6  # fp16 subnormals, bf16 small normals
    params.append(torch.randn(6, 5, 3, 3).to(memory_format=torch.channels_last))
    return [torch.nn.Parameter(p.to(dtype)) for p in params]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype).to(memory_format=torch.preserve_format)
            for p in params]


def _run(make, dtype, backend, steps=3, seed=42, params=None, opt=None, first_step=0):
    params = _params(dtype) if params is None else params
    opt = make(params, seed=seed) if opt is None else opt
    for step in range(first_step, first_step + steps):
        for p, g in zip(params, _grads(params, step)):
            p.grad = torch.empty_like(p).copy_(g)
        with use_backend(backend):
            opt.step()
    return params, opt


def _bits(tensors):
    return [t.detach().view(torch.uint8) if t.element_size() == 1 else
            t.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) for t in tensors]


def _snapshot(params, opt):
    states = [v for p in params for v in opt.state[p].values() if torch.is_tensor(v)]
    return _bits(list(params) + states)


def _assert_identical(a, b, what):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{what}: tensor {i} differs in {(x != y).sum().item()} of {x.numel()} elements"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_backends_bit_identical(name, dtype):
    """Interpreted Triton, the C++ CPU kernel and the PyTorch path write the same bits."""
    results = {backend: _snapshot(*_run(OPTIMIZERS[name], dtype, backend)) for backend in ("torch", "cpu", "triton")}
    _assert_identical(results["torch"], results["cpu"], "cpu vs torch")
    _assert_identical(results["torch"], results["triton"], "triton vs torch")


@pytest.mark.parametrize("seed", [1, 2**31 + 5, 2**32 + 1, 2**63 - 1])
def test_seeds_across_the_64_bit_range_agree_across_backends(seed):
    """Both key words reach every backend (the high word too, and values a JIT might specialise on)."""
    make = OPTIMIZERS["adamw"]
    a = _snapshot(*_run(make, torch.bfloat16, "cpu", steps=1, seed=seed))
    b = _snapshot(*_run(make, torch.bfloat16, "triton", steps=1, seed=seed))
    _assert_identical(a, b, f"triton vs cpu, seed {seed}")
    if seed == 2**32 + 1:  # the same low word as seed 1: the high word must change the bits
        c = _snapshot(*_run(make, torch.bfloat16, "cpu", steps=1, seed=1))
        assert any(not torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("stochastic", [True, False])
def test_both_rounding_modes_agree_across_backends(stochastic):
    make = lambda params, **kw: tlcore.optim.AdamW(params, lr=1e-3, stochastic_rounding=stochastic, **kw)  # noqa: E731
    a = _snapshot(*_run(make, torch.bfloat16, "cpu"))
    b = _snapshot(*_run(make, torch.bfloat16, "triton"))
    _assert_identical(a, b, "triton vs cpu")


def test_round_to_nearest_is_deterministic_and_seed_free():
    make = lambda params, **kw: tlcore.optim.SGD(params, lr=1e-2, stochastic_rounding=False, **kw)  # noqa: E731
    a = _snapshot(*_run(make, torch.bfloat16, "cpu", seed=1))
    b = _snapshot(*_run(make, torch.bfloat16, "cpu", seed=2))
    _assert_identical(a, b, "seed 1 vs 2 with round-to-nearest")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_same_seed_same_bits_other_seed_other_bits(name):
    a = _snapshot(*_run(OPTIMIZERS[name], torch.bfloat16, "cpu", seed=7))
    b = _snapshot(*_run(OPTIMIZERS[name], torch.bfloat16, "cpu", seed=7))
    c = _snapshot(*_run(OPTIMIZERS[name], torch.bfloat16, "cpu", seed=8))
    _assert_identical(a, b, "two runs, seed 7")
    assert any(not torch.equal(x, y) for x, y in zip(a, c)), "seeds 7 and 8 gave identical bits"


def test_seed_none_draws_from_torch_generator():
    torch.manual_seed(123)
    a = tlcore.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]["seed"]
    torch.manual_seed(123)
    b = tlcore.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]["seed"]
    c = tlcore.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]["seed"]
    assert a == b != c


@pytest.mark.parametrize("int_steps", [False, True], ids=["", "int steps"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resume_from_state_dict_is_bit_identical(name, dtype, int_steps):
    """5 uninterrupted steps == 2 steps, save, load (weights_only=True) into fresh objects, 3 steps;
    also from a checkpoint that keeps its steps as ints (tlcore's before they became tensors)."""
    make = OPTIMIZERS[name]
    whole = _snapshot(*_run(make, dtype, "cpu", steps=5))

    params, opt = _run(make, dtype, "cpu", steps=2)
    checkpoint = copy.deepcopy(opt.state_dict())
    if int_steps:
        for state in checkpoint["state"].values():
            state["step"] = int(state["step"])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": checkpoint}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    resumed = make(fresh, seed=999)  # the seed comes back from the state dict
    resumed.load_state_dict(saved["opt"])
    assert resumed.param_groups[0]["seed"] == 42
    _assert_identical(whole, _snapshot(*_run(make, dtype, "cpu", steps=3, params=fresh, opt=resumed,
                                             first_step=2)), "resumed vs uninterrupted")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_grad_scaler_skips_inf_steps_and_unscales(dtype):
    """fp16 params + GradScaler: an inf gradient skips the step; otherwise the scale is folded in."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    param = torch.nn.Parameter(torch.randn(64).to(dtype))
    twin = torch.nn.Parameter(param.detach().clone())
    opt = tlcore.optim.AdamW([param], lr=1e-2, seed=0)
    ref = tlcore.optim.AdamW([twin], lr=1e-2, seed=0)
    before = param.detach().clone()

    scaler.scale((param.float() * float("inf")).sum()).backward()  # inf gradients
    scaler.step(opt)
    scaler.update()
    assert torch.equal(param.detach(), before) and param not in opt.state
    assert scaler.get_scale() == 512.0

    opt.zero_grad()
    loss = (param.float() * torch.linspace(-1, 1, 64)).sum()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    twin.grad = torch.linspace(-1, 1, 64).to(dtype)  # the unscaled gradient
    ref.step()
    assert not torch.equal(param.detach(), before) and opt.state[param]["step"] == 1
    assert torch.equal(param.detach(), twin.detach())


@pytest.mark.parametrize("true_norm", [0.5, 4.0, float("inf")])
def test_clip_grad_norm_under_grad_scaler_fp16(true_norm):
    """tlcore.optim.clip_grad_norm_ with GradScaler's default scale (65536) on fp16 gradients: the
    scaled norm overflows fp16 (torch's clip_grad_norm_ would then zero every gradient), so it sums
    in fp32 and clips the unscaled norm to max_norm; an inf gradient still makes the step skip."""
    scaler = torch.amp.GradScaler("cpu")
    n = 2**20
    direction = torch.randn(n, generator=torch.Generator().manual_seed(0))
    direction /= direction.norm()
    param = torch.nn.Parameter(torch.randn(n).half())
    twin = torch.nn.Parameter(param.detach().clone())
    opt = tlcore.optim.SGD([param], lr=1e-2, seed=0)
    ref = tlcore.optim.SGD([twin], lr=1e-2, seed=0)
    gradient = direction * (1.0 if math.isinf(true_norm) else true_norm)
    if math.isinf(true_norm):
        gradient[7] = float("inf")
    scaler.scale((param.float() * gradient).sum()).backward()
    before = param.detach().clone()
    total = tlcore.optim.clip_grad_norm_([param], 1.0, scaler=scaler)
    scaler.step(opt)
    scaler.update()
    if math.isinf(true_norm):
        assert math.isinf(total) and torch.equal(param.detach(), before) and scaler.get_scale() == 32768.0
        return
    assert abs(total.item() - true_norm) < 1e-3 * true_norm
    twin.grad = (gradient * min(1.0, 1.0 / true_norm)).half()
    ref.step()
    torch.testing.assert_close(param, twin, rtol=0, atol=2e-3)  # fp16 rounding of the two gradients
    assert (param.detach() - before).abs().max() > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on both ranks
        model = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.ReLU(), torch.nn.Linear(17, 3)).to(torch.bfloat16)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(rank)  # different data (and generator state) per rank
        opt = tlcore.optim.AdamW(ddp.parameters(), lr=1e-2)  # seed=None: rank 0's draw is shared
        for _ in range(4):
            x = torch.randn(8, 9).to(torch.bfloat16)
            opt.zero_grad()
            ddp(x).float().square().mean().backward()
            opt.step()
        torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))
        _dtensor_matches_torch(rank)
    finally:
        dist.destroy_process_group()


def _dtensor_matches_torch(rank):
    """FSDP2-style DTensor parameters (rows sharded over the 2 ranks): each rank updates its shard,
    and with fp32 parameters the shards match torch.optim.AdamW's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    full, grad = torch.randn(11, 3), torch.randn(11, 3)
    ours, stock = (torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)])) for _ in range(2))
    for p in (ours, stock):
        p.grad = distribute_tensor(grad, mesh, [Shard(0)])
    opt = tlcore.optim.AdamW([ours], lr=1e-2, seed=0)
    ref = torch.optim.AdamW([stock], lr=1e-2, foreach=False)
    for _ in range(2):
        opt.step()
        ref.step()
    mine, theirs = ours.to_local(), stock.to_local()
    assert mine.shape[0] == (6 if rank == 0 else 5)
    assert torch.allclose(mine, theirs, rtol=1e-6, atol=0), f"rank {rank}: DTensor shard differs"
    assert not torch.equal(mine, full[:6] if rank == 0 else full[6:])


def test_ddp_replicas_stay_identical_and_dtensor_shards_update(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    torch.manual_seed(0)
    init = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.ReLU(), torch.nn.Linear(17, 3)).to(torch.bfloat16)
    _assert_identical(_bits(rank0), _bits(rank1), "rank 0 vs rank 1")
    assert all(not torch.equal(a, b) for a, b in zip(rank0, init.parameters())), "DDP training did not move"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels: GPU only")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_gpu_backends_bit_identical_to_cpu(name, dtype):
    """Compiled Triton and the CUDA C++ kernel on the GPU write the CPU kernel's bits."""
    cpu = _snapshot(*_run(OPTIMIZERS[name], dtype, "cpu"))
    for backend in ("triton", "cuda"):
        params = [torch.nn.Parameter(p.detach().cuda()) for p in _params(dtype)]
        opt = OPTIMIZERS[name](params, seed=42)
        for step in range(3):
            for p, g in zip(params, _grads(params, step)):
                p.grad = torch.empty_like(p).copy_(g)
            with use_backend(backend):
                opt.step()
        gpu = [t.cpu() for t in _snapshot(params, opt)]
        _assert_identical(cpu, gpu, f"{backend} on the GPU vs the CPU kernel")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="2**32-element tensors: GPU only")
def test_gpu_element_index_past_2_to_the_32():
    """The Philox counter's high word: elements past 2**32 get other bits than their low-word twins."""
    n = 2**32 + 1024
    param = torch.nn.Parameter(torch.ones(n, device="cuda", dtype=torch.bfloat16))
    param.grad = torch.full_like(param, 2**-12)  # a sub-ulp step: each element rounds by its own bits
    tlcore.optim.SGD([param], lr=1.0, seed=1).step()
    low, high = param[:1024], param[2**32:]
    assert not torch.equal(low, high), "elements i and i + 2**32 got the same random bits"
    cpu_tail = torch.ones(1024, dtype=torch.bfloat16)
    ref = tlcore.ops.optim.philox_words(1, torch.arange(2**32, n), 0, 1)[0]
    expected = tlcore.ops.optim.round_to_bits(cpu_tail.float() - 2**-12, ref, torch.bfloat16, True)
    assert torch.equal(high.cpu(), expected)


def test_sgd_momentum_switched_on_mid_run_starts_its_buffer():
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(33))
    twin = torch.nn.Parameter(ours.detach().clone())
    opt = tlcore.optim.SGD([ours], lr=0.1, momentum=0.0, seed=0)
    ref = torch.optim.SGD([twin], lr=0.1, momentum=0.0)
    for step in range(3):
        if step == 1:
            opt.param_groups[0]["momentum"] = ref.param_groups[0]["momentum"] = 0.9
        ours.grad = torch.randn(33)
        twin.grad = ours.grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours, twin, rtol=1e-6, atol=1e-7)


def test_a_rejected_step_changes_no_state():
    good = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    bad = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    opt = tlcore.optim.AdamW([good, bad], seed=0)
    good.grad = torch.randn(4, dtype=torch.bfloat16)
    bad.grad = torch.randn(4).to_sparse().to(torch.bfloat16)
    before = good.detach().clone()
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        opt.step()
    assert len(opt.state[good]) == 0 and torch.equal(good.detach(), before)


@pytest.mark.parametrize("resume", [False, True], ids=["same optimizer", "resumed from a contiguous checkpoint"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_states_follow_a_parameter_to_channels_last(name, dtype, resume):
    """A weight moved to channels_last after its first step (or a checkpoint loaded into such a
    model) keeps its states' values, copied to its new layout; each step counts once. fp32 steps
    round nothing, so there they must match a twin that stayed contiguous bit for bit."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3).to(dtype)
    twin = copy.deepcopy(conv)
    opt, twin_opt = OPTIMIZERS[name](conv.parameters(), seed=0), OPTIMIZERS[name](twin.parameters(), seed=0)
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    for step in range(2):
        if step == 1:
            checkpoint = copy.deepcopy(opt.state_dict())
            conv.to(memory_format=torch.channels_last)
            if resume:
                opt = OPTIMIZERS[name](conv.parameters(), seed=0)
                opt.load_state_dict(checkpoint)
        for model, optimizer in ((conv, opt), (twin, twin_opt)):
            model.zero_grad()
            model(x).sum().backward()
            optimizer.step()
    state = opt.state[conv.weight]
    assert state["step"] == 2 and conv.weight.stride() != twin.weight.stride()
    names = [key for key in state if key != "step"]
    assert names and all(state[key].stride() == conv.weight.stride() for key in names)
    if dtype == torch.float32:
        assert torch.equal(conv.weight, twin.weight)
        assert all(torch.equal(state[key], twin_opt.state[twin.weight][key]) for key in names)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_loads_a_torch_optim_state_dict(name):
    """A torch.optim.AdamW / SGD checkpoint resumes under tlcore's optimizer: fp32 parameters then
    follow torch.optim's own trajectory; fp16 ones get their states in fp32."""
    stock = {"adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
             "sgd": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01)}[name]
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(37)), torch.nn.Parameter(torch.randn(5, 7))]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    ref_opt = stock(ref)
    for step in range(6):
        for p, g in zip(ref, _grads(ref, step)):
            p.grad = g
        if step == 3:
            for p, q in zip(ours, ref):
                p.data.copy_(q.detach())
            opt = OPTIMIZERS[name](ours, seed=0)
            opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # (as saved: not sharing its tensors)
        if step >= 3:
            for p, q in zip(ours, ref):
                p.grad = q.grad.clone()
            opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    resumed_steps = 6 if name == "adamw" else 3  # (torch.optim.SGD keeps no step count)
    assert all(opt.state[p]["step"] == resumed_steps for p in ours)

    # fp16 parameters: torch.optim's fp16 states load as fp32 (exact) and go on as torch's do
    ref = torch.nn.Parameter(torch.randn(64, dtype=torch.float16))
    ref.grad = torch.randn(64, dtype=torch.float16)
    ref_opt = stock([ref])
    ref_opt.step()
    ours = torch.nn.Parameter(ref.detach().clone())
    ours.grad = ref.grad.clone()
    opt = OPTIMIZERS[name]([ours], seed=0)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    opt.step()
    ref_opt.step()
    for key, value in ref_opt.state[ref].items():
        if key != "step":
            assert opt.state[ours][key].dtype == torch.float32
            torch.testing.assert_close(opt.state[ours][key], value.float(), rtol=2e-3, atol=1e-5)


def test_group_settings_are_checked_before_they_are_added():
    w = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.randn(4, dtype=torch.float16))
    opt = tlcore.optim.AdamW([w], lr=0.1, seed=0)
    for bad, error in [({"state_dtype": torch.float16}, "state_dtype"), ({"seed": 1.5}, "seed"),
                       ({"seed": -1}, "seed"), ({"amsgrad": True}, "amsgrad")]:
        with pytest.raises((ValueError, NotImplementedError), match=error):
            opt.add_param_group({"params": [b], **bad})
        assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b], "seed": np.int64(3)})
    assert opt.param_groups[1]["seed"] == 3 and type(opt.param_groups[1]["seed"]) is int
    opt.param_groups[1]["state_dtype"] = torch.float16  # changed by hand: the step refuses it whole
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    before = w.detach().clone()
    with pytest.raises(ValueError, match="state_dtype"):
        opt.step()
    assert torch.equal(w.detach(), before) and not opt.state[w]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_torch_optim_keywords(name):
    """torch.optim's own keywords are accepted with their defaults (and foreach/fused with any value):
    the same bits as without them; the options tlcore lacks are refused when on, also from a checkpoint."""
    extra = dict(maximize=False, foreach=True, fused=None, differentiable=False)
    if name == "adamw":
        extra.update(amsgrad=False, capturable=False)
    plain = _run(OPTIMIZERS[name], torch.bfloat16, "cpu")
    keyed = _run(lambda params, **kw: OPTIMIZERS[name](params, **kw, **extra), torch.bfloat16, "cpu")
    _assert_identical(_snapshot(*plain), _snapshot(*keyed), "torch.optim keywords")
    with pytest.raises(NotImplementedError, match="maximize"):
        OPTIMIZERS[name](_params(torch.bfloat16), maximize=True)
    stock = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name](_params(torch.float32), lr=1e-2, maximize=True)
    with pytest.raises(NotImplementedError, match="maximize"):
        OPTIMIZERS[name](_params(torch.float32)).load_state_dict(stock.state_dict())


def test_another_algorithms_state_dict_is_refused():
    """SGD's groups into AdamW, or torch.optim.Adam's L2 weight decay: refused, nothing loaded."""
    params = _params(torch.float32)
    opt = OPTIMIZERS["adamw"](params)
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(torch.optim.SGD(params, lr=0.1, momentum=0.9).state_dict())
    adam_l2 = torch.optim.Adam(params, lr=0.1, weight_decay=0.01).state_dict()
    if "decoupled_weight_decay" in adam_l2["param_groups"][0]:  # (torch < 2.7 does not record it)
        with pytest.raises(ValueError, match="L2"):
            opt.load_state_dict(adam_l2)
    nadam = torch.optim.NAdam(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    nadam.step()
    with pytest.raises(ValueError, match="mu_product"):
        opt.load_state_dict(nadam.state_dict())
    assert opt.param_groups[0]["lr"] == 1e-2


@pytest.mark.skipif(not _extension.loaded(), reason="the C++ CPU kernels trace here; Triton ones need a GPU")
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compiled_step_traces_once_and_matches_eager(name):
    """torch.compile(fullgraph=True) over opt.step(): the same bits as eager, and no recompile per
    step (a Python int step count would specialize the graph on each value: a hard failure at
    torch's recompile limit), also with a tensor lr changed in place every step, as LR schedulers
    change one (torch's advice for compiling under a scheduler)."""
    counter = torch._dynamo.testing.CompileCounter()

    def train(compile_step):
        params = _params(torch.bfloat16)
        opt = OPTIMIZERS[name](params, seed=7)
        lr = opt.param_groups[0]["lr"] = torch.tensor(1e-2)
        step = torch.compile(opt.step, backend=counter, fullgraph=True) if compile_step else opt.step
        for i in range(10):
            for p, g in zip(params, _grads(params, i)):
                p.grad = torch.empty_like(p).copy_(g)
            step()
            lr.mul_(0.8)
        return _snapshot(params, opt)

    _assert_identical(train(compile_step=True), train(compile_step=False), "compiled against eager")
    assert counter.frame_count <= 2  # the first step (states created) and the rest


def test_a_bad_state_shape_is_refused_before_any_state_changes():
    """A state_dict of another model (a state of the wrong shape): the step raises and creates no
    state for the parameters before it (SGD would otherwise start their buffers unfresh)."""
    first, second = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(5))
    opt = tlcore.optim.SGD([first, second], lr=0.1, momentum=0.5, dampening=0.5, seed=0)
    opt.state[second]["momentum_buffer"] = torch.zeros(6)
    first.grad, second.grad = torch.ones(4), torch.ones(5)
    with pytest.raises(ValueError, match="has shape"):
        opt.step()
    assert first not in opt.state


def test_one_element_tensor_lr():
    """torch.optim takes an lr of shape (1,) as well as a 0-dim one."""
    params, opt = _run(OPTIMIZERS["adamw"], torch.bfloat16, "cpu", steps=1)
    opt.param_groups[0]["lr"] = torch.tensor([1e-2])
    tensor_lr = _snapshot(*_run(OPTIMIZERS["adamw"], torch.bfloat16, "cpu", steps=2, params=params, opt=opt,
                                first_step=1))
    _assert_identical(_snapshot(*_run(OPTIMIZERS["adamw"], torch.bfloat16, "cpu", steps=3)), tensor_lr, "lr (1,)")
