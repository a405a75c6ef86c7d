"""fp32 parameters: tlcore.optim.AdamW / SGD take the same steps as torch.optim (1e-6 relative)."""
import pytest
import torch

import tlcore
from numerics import rel_error
from tlcore.backend import use_backend

BACKENDS = ["cpu", "triton", "torch"]
STEPS = 6


def _model() -> torch.nn.Module:
    """Odd sizes, a channels_last conv weight (not contiguous) and a parameter left without grads."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.Flatten(), torch.nn.Linear(5 * 5 * 5, 7))
    model[0].to(memory_format=torch.channels_last)
    model.unused = torch.nn.Parameter(torch.randn(4))
    return model


def _groups(model):
    """Two param groups with their own lr (discriminative fine-tuning)."""
    return [{"params": [model[0].weight, model[0].bias, model.unused]},
            {"params": [model[2].weight, model[2].bias], "lr": 3e-3}]


def _train(model, opt, sched, steps=STEPS):
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 3, 7, 7)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _compare(ours, stock):
    for (name, a), b in zip(ours.named_parameters(), stock.parameters()):
        assert rel_error(a, b) <= 1e-6, f"{name}: relative error {rel_error(a, b):.3g}"
        assert not torch.equal(a, _model().get_parameter(name)) or name == "unused", f"{name} did not move"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adamw_matches_torch(backend, weight_decay):
    ours, stock = _model(), _model()
    opt = tlcore.optim.AdamW(_groups(ours), lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, seed=0)
    ref = torch.optim.AdamW(_groups(stock), lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    with use_backend(backend):
        _train(ours, opt, torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5))
    _train(stock, ref, torch.optim.lr_scheduler.StepLR(ref, 2, gamma=0.5))
    _compare(ours, stock)


SGD_CONFIGS = [
    dict(momentum=0.0, weight_decay=0.0),
    dict(momentum=0.9, weight_decay=1e-2),
    dict(momentum=0.9, dampening=0.3, weight_decay=0.0),
    dict(momentum=0.8, nesterov=True, weight_decay=1e-2),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_sgd_matches_torch(backend, config):
    ours, stock = _model(), _model()
    opt = tlcore.optim.SGD(_groups(ours), lr=5e-2, seed=0, **config)
    ref = torch.optim.SGD(_groups(stock), lr=5e-2, **config)
    with use_backend(backend):
        _train(ours, opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[5e-2, 1e-2], total_steps=STEPS))
    _train(stock, ref, torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=[5e-2, 1e-2], total_steps=STEPS))
    _compare(ours, stock)


def test_zero_grad_and_grad_none_params_are_skipped():
    """A parameter without a grad keeps its value, gets no state and no step."""
    model = _model()
    before = model.unused.detach().clone()
    opt = tlcore.optim.AdamW(model.parameters(), lr=1e-2, seed=0)
    _train(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), steps=2)
    assert torch.equal(model.unused, before) and model.unused not in opt.state
    assert opt.state[model[0].weight]["step"] == 2
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_state_dtype_defaults_and_override():
    p16, pb, p32 = (torch.nn.Parameter(torch.randn(3, dtype=d)) for d in (torch.float16, torch.bfloat16, torch.float32))
    for p in (p16, pb, p32):
        p.grad = torch.randn_like(p)
    opt = tlcore.optim.AdamW([p16, pb, p32], seed=0)
    opt.step()
    assert [opt.state[p]["exp_avg_sq"].dtype for p in (p16, pb, p32)] == [torch.float32, torch.bfloat16,
                                                                          torch.float32]
    opt = tlcore.optim.SGD([pb], momentum=0.9, seed=0, state_dtype=torch.float32)
    opt.step()
    assert opt.state[pb]["momentum_buffer"].dtype == torch.float32
    with pytest.raises(ValueError, match="state_dtype"):
        tlcore.optim.AdamW([pb], state_dtype=torch.float16)

