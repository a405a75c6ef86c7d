"""Optimizers for 16-bit training without fp32 master weights, with stochastic rounding.

    model = model.to(torch.bfloat16)
    opt = tlcore.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, seed=0)

Both are torch.optim.Optimizer subclasses (LR schedulers, param groups, state_dict,
GradScaler and DDP work as with torch.optim); each step is one fused op per
(device, dtype, state dtype) group: tlcore.ops.optim. clip_grad_norm_ clips fp16
gradients that a GradScaler's scale is still in (it refuses to unscale_ them).
"""
from tlcore.optim.adamw import AdamW
from tlcore.optim.clip import clip_grad_norm_
from tlcore.optim.sgd import SGD

__all__ = ["AdamW", "SGD", "clip_grad_norm_"]
