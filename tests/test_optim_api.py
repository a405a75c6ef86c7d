"""tlcore.optim where a drop-in user leans on torch.optim's contract: its hooks, its edge cases and errors."""
import pytest
import torch

import tlcore

OPTIMIZERS = {
    "adamw": lambda params, **kw: tlcore.optim.AdamW(params, lr=1e-2, **kw),
    "sgd": lambda params, **kw: tlcore.optim.SGD(params, lr=1e-2, momentum=0.9, **kw),
}
STATE = {"adamw": "exp_avg", "sgd": "momentum_buffer"}


def _stepped(name, dtype=torch.bfloat16):
    """An optimizer of `name` over one parameter (and the parameter) after one step."""
    param = torch.nn.Parameter(torch.randn(6, dtype=dtype))
    opt = OPTIMIZERS[name]([param], seed=0)
    param.grad = torch.randn(6).to(dtype)
    opt.step()
    return opt, param


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_parameter_listed_twice_is_refused(name):
    """One fused launch would update both entries at once from one step count, racing on the memory
    (torch.optim only warns, then applies two updates): refused, in the constructor and in
    add_param_group; named parameters too."""
    param, other = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="more than once"):
        OPTIMIZERS[name]([param, other, param], seed=0)
    with pytest.raises(ValueError, match="more than once"):
        OPTIMIZERS[name]([("a", param), ("b", param)], seed=0)
    opt = OPTIMIZERS[name]([param], seed=0)
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": (p for p in (other, other))})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": other})  # (a lone tensor, as torch.optim takes it)
    assert opt.param_groups[1]["params"] == [other]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_step_without_any_gradient_does_nothing(name):
    """As torch.optim's: a frozen model, or an optimizer whose parameters went unused this iteration,
    also under a GradScaler shared with an optimizer that had gradients (a GAN's two, an unused head):
    it hands the idle one a found_inf of the int 0."""
    idle, used = (torch.nn.Parameter(torch.randn(4, dtype=torch.float16)) for _ in range(2))
    before = idle.detach().clone()
    opt = OPTIMIZERS[name]([idle], seed=0)
    opt.step()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(used.float().sum()).backward()
    scaler.step(OPTIMIZERS[name]([used], seed=0))
    scaler.step(opt)
    scaler.update()
    assert torch.equal(idle.detach(), before) and not opt.state[idle]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_an_unsupported_parameter_dtype_is_refused_before_any_update(name):
    """An fp64 parameter after a bf16 one: the step raises before the bf16 one (a batch of its own) moves."""
    half, double = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16)), torch.nn.Parameter(torch.ones(4).double())
    opt = OPTIMIZERS[name]([half, double], seed=0)
    half.grad, double.grad = torch.ones_like(half), torch.ones_like(double)
    with pytest.raises(TypeError, match="float64"):
        opt.step()
    assert torch.equal(half.detach(), torch.ones(4, dtype=torch.bfloat16)) and not opt.state[half]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_load_state_dict_runs_the_users_hooks(name):
    """A pre-hook's state_dict is the one loaded (also its step counts, in their saved dtypes) and
    a post-hook's changes stay, as with torch.optim."""
    saved, _ = _stepped(name)
    state = STATE[name]

    def pre_hook(optimizer, state_dict):
        edited = {"param_groups": state_dict["param_groups"], "state": {}}
        for key, value in state_dict["state"].items():
            edited["state"][key] = dict(value, step=torch.tensor(5), **{state: torch.full((6,), 42.0)})
        return edited

    opt, param = _stepped(name)
    opt.register_load_state_dict_pre_hook(pre_hook)
    opt.load_state_dict(saved.state_dict())
    assert torch.equal(opt.state[param][state], torch.full((6,), 42.0))  # fp32, as the hook made it
    assert opt.state[param]["step"].dtype == torch.int64 and int(opt.state[param]["step"]) == 5

    opt, param = _stepped(name)
    opt.register_load_state_dict_post_hook(lambda optimizer: optimizer.state[param][state].fill_(7.0))
    opt.load_state_dict(saved.state_dict())
    assert torch.equal(opt.state[param][state], torch.full((6,), 7.0, dtype=torch.bfloat16))


def test_a_pre_hooks_foreign_state_dict_is_refused():
    """The checks see what the pre-hooks hand over: a hook that returns another algorithm's state_dict
    (here SGD's, into AdamW) is refused like that state_dict itself."""
    sgd, _ = _stepped("sgd")
    opt, param = _stepped("adamw")
    opt.register_load_state_dict_pre_hook(lambda optimizer, state_dict: sgd.state_dict())
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(opt.state_dict())
    assert int(opt.state[param]["step"]) == 1


@pytest.mark.parametrize("optimizer", [tlcore.optim.AdamW, tlcore.optim.SGD], ids=lambda cls: cls.__name__)
def test_learning_rates_are_checked_as_torch_optim_does(optimizer):
    param = torch.nn.Parameter(torch.randn(4))
    for lr, message in [(torch.tensor([0.1, 0.2]), "Tensor lr must be 1-element"), (-0.1, "Invalid learning rate"),
                        (float("nan"), "Invalid learning rate")]:
        with pytest.raises(ValueError, match=message):
            optimizer([param], lr=lr, seed=0)


def test_clip_grad_norm_takes_torch_positional_norm_type():
    """clip_grad_norm_(params, max_norm, 2.0) as with torch's; other norms are refused, not ignored."""
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    total = tlcore.optim.clip_grad_norm_([param], 1.0, 2.0)
    torch.testing.assert_close(total, torch.tensor(5.0))
    torch.testing.assert_close(param.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="2-norm"):
        tlcore.optim.clip_grad_norm_([param], 1.0, float("inf"))
