"""tlcore.optim.SGD: SGD (momentum, Nesterov) on 16-bit parameters with stochastic rounding."""
import functools
from typing import Any, Optional

import torch

from tlcore.ops.optim import sr_sgd_
from tlcore.optim.base import StochasticRoundingOptimizer, check_lr, group_values


class SGD(StochasticRoundingOptimizer):
    """torch.optim.SGD's update for bf16/fp16/fp32 parameters, no fp32 master copy.

    The update runs in fp32; parameters and 16-bit momentum buffers are written back
    with stochastic rounding; fp32 parameters and buffers are written back unrounded.

    Args:
        params: parameters or param groups.
        lr, momentum, dampening, weight_decay, nesterov: as torch.optim.SGD.
        maximize, foreach, differentiable, fused, stochastic_rounding, seed, state_dtype: as
            tlcore.optim.AdamW (state_dtype is the momentum buffer's dtype).

    State per parameter: "step" (int64 tensor) and, with momentum, "momentum_buffer".
    """

    _op_name = "tlcore.optim.SGD"
    _STATE_KEYS = ("momentum_buffer",)

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False, fused: Optional[bool] = None,
                 stochastic_rounding: bool = True, seed: Optional[int] = None,
                 state_dtype: Optional[torch.dtype] = None):
        check_lr(lr)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        del foreach, fused  # torch.optim's implementation choices: every tlcore step is one fused launch
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize, differentiable=differentiable),
                         stochastic_rounding=stochastic_rounding, seed=seed, state_dtype=state_dtype)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self._STATE_KEYS if group["momentum"] != 0 else ()

    def _hyper(self, groups: list[dict[str, Any]], where: torch.Tensor, steps: torch.Tensor,
               inv_scale: float) -> torch.Tensor:
        value = functools.partial(group_values, groups, where)
        lr = value("lr")
        unused = torch.zeros_like(lr)
        return torch.stack([lr, value("weight_decay"), value("momentum"), 1.0 - value("dampening"),
                            torch.full_like(lr, inv_scale), unused, unused, unused], 1)

    def _batch_key(self, group: dict[str, Any]) -> tuple:
        return (bool(group["nesterov"]),)

    def _launch(self, key, tensors, hyper, counters, seed, stochastic) -> None:
        params, grads, *buffers = tensors
        sr_sgd_(params, grads, buffers[0] if buffers else [], hyper, counters, key[-1], seed, stochastic)
