"""tlcore.optim.AdamW: AdamW on 16-bit parameters and states with stochastic rounding."""
import functools
from typing import Any, Optional

import torch

from tlcore.ops.optim import sr_adamw_
from tlcore.optim.base import StochasticRoundingOptimizer, check_lr, group_values


class AdamW(StochasticRoundingOptimizer):
    """torch.optim.AdamW's update (decoupled weight decay) for bf16/fp16/fp32 parameters, no fp32 master copy.

    The update runs in fp32; parameters and 16-bit states are written back with
    stochastic rounding (E[round(x)] = x), so updates smaller than half an ulp still
    move the weights on average. fp32 parameters and states are written back unrounded.

    Args:
        params: parameters or param groups (each group may set lr, betas, eps, weight_decay).
        lr, betas, eps, weight_decay: as torch.optim.AdamW.
        amsgrad, maximize, foreach, capturable, differentiable, fused: torch.optim's, accepted
            for drop-in use; amsgrad, maximize and differentiable only when False (not
            implemented); foreach, fused and capturable change nothing (every step is fused).
        stochastic_rounding: False rounds to nearest (even) instead.
        seed: keys the random stream (with step, parameter index, element); None draws
            one from torch's default generator. Kept in state_dict() for bit-identical resume.
        state_dtype: dtype of exp_avg / exp_avg_sq: None picks bf16 for bf16 parameters
            and fp32 otherwise; torch.float32 or torch.bfloat16 force one.

    State per parameter: "step" (int64 tensor), "exp_avg", "exp_avg_sq" (parameter-shaped, state_dtype).
    """

    _op_name = "tlcore.optim.AdamW"
    _STATE_KEYS = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, stochastic_rounding: bool = True, seed: Optional[int] = None,
                 state_dtype: Optional[torch.dtype] = None):
        check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        del foreach, fused, capturable  # torch.optim's implementation choices: every tlcore step is fused
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize, differentiable=differentiable),
                         stochastic_rounding=stochastic_rounding, seed=seed, state_dtype=state_dtype)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self._STATE_KEYS

    def _hyper(self, groups: list[dict[str, Any]], where: torch.Tensor, steps: torch.Tensor,
               inv_scale: float) -> torch.Tensor:
        value = functools.partial(group_values, groups, where)
        lr, weight_decay, eps, beta1, beta2 = (value("lr"), value("weight_decay"), value("eps"), value("betas", 0),
                                               value("betas", 1))
        t = steps.double()
        return torch.stack([1.0 - lr * weight_decay, lr / (1.0 - beta1**t), torch.sqrt(1.0 - beta2**t), eps,
                            1.0 - beta1, beta2, 1.0 - beta2, torch.full_like(lr, inv_scale)], 1)

    def _launch(self, key, tensors, hyper, counters, seed, stochastic) -> None:
        sr_adamw_(*tensors, hyper, counters, seed, stochastic)
