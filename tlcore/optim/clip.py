"""tlcore.optim.clip_grad_norm_: gradient clipping for 16-bit gradients, GradScaler's scale still in them."""
from collections.abc import Iterable
from typing import Optional

import torch


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0, *,
                    scaler: Optional["torch.amp.GradScaler"] = None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm only: norm_type is there for drop-in calls) for fp16/bf16
    gradients, also scaled ones.

    With fp16 parameters a GradScaler refuses to unscale_ the gradients, so they are clipped while
    still scaled: their norm is summed in fp32 (in fp16 it overflows past 65504: at the default
    scale of 65536 any true norm above 1 would clip every gradient to zero) and divided by the
    scaler's scale, and the gradients are multiplied by min(1, max_norm / norm), which clips their
    unscaled norm to max_norm. Pass the scaler only while its scale is in the gradients (not after
    scaler.unscale_). Inf or NaN gradients make the norm non-finite and those elements NaN (the
    finite ones zero), so the scaler's step still skips the step.

        scaler.scale(loss).backward()
        tlcore.optim.clip_grad_norm_(model.parameters(), 1.0, scaler=scaler)
        scaler.step(opt)
        scaler.update()

    Returns the total norm of the unscaled gradients (fp32, 0-dim).
    """
    if norm_type != 2.0:
        raise ValueError(f"tlcore.optim.clip_grad_norm_: norm_type={norm_type!r}; only the 2-norm is implemented "
                         "(torch.nn.utils.clip_grad_norm_ takes the others, on unscaled gradients)")
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32).to(device) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms))
    if scaler is not None:
        total = total / scaler.get_scale()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total
