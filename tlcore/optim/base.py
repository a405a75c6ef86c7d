"""What tlcore's stochastic-rounding optimizers share: state handling, grouping, AMP scaling.

A subclass says which states a parameter has and how a group's hyper-parameters
become one row of the op's fp32 table; this base walks the parameters, batches them
by (device, dtype, state dtype, ...) and makes one fused op call per batch.

Reproducibility: the random bits of a step are keyed by (seed, step, parameter index,
element), where the parameter index counts parameters across all param groups in
order (grad-less ones included), so a run resumed from `state_dict()` — which carries
the seed in every param group and the step in every parameter's state — continues
bit-identically, and DDP replicas stay identical. DTensor (FSDP2) parameters are
updated shard by shard through to_local(); the element index is then the position in
the local shard, so the shards of one parameter draw from the same counters (each
rounding still sees independent-looking bits for its own value).

With a GradScaler (fp16), step() reads found_inf and the scale on the host (one sync)
to skip the step or fold 1/scale into the update.
"""
import abc
import numbers
from collections import defaultdict
from typing import Any, Callable, Optional

import torch

from tlcore.ops.optim import MAX_SEED, SUPPORTED_DTYPES, is_dense

STATE_DTYPES = (torch.float32, torch.bfloat16)
# torch.optim options that tlcore does not implement: accepted (for drop-in use, and in a loaded
# torch.optim state_dict's groups) only when off. foreach, fused and capturable are accepted and
# change nothing: every step is one fused launch per batch of parameters (and torch.compile's
# optimizer tracing switches capturable on in the groups that have it, e.g. loaded ones).
OFF_ONLY_OPTIONS = ("amsgrad", "maximize", "differentiable")


def default_state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """bf16 states for bf16 parameters; fp32 otherwise (fp16's range cannot hold squared gradients)."""
    return torch.bfloat16 if param_dtype == torch.bfloat16 else torch.float32


def new_step_count(steps: int = 0) -> torch.Tensor:
    """A parameter's step count: an int64 CPU tensor, as torch.optim keeps a tensor, so that
    torch.compile traces a step for every count instead of specializing on each one."""
    return torch.tensor(steps, dtype=torch.int64)


def group_values(groups: list[dict[str, Any]], where: torch.Tensor, name: str,
                 index: Optional[int] = None) -> torch.Tensor:
    """(T,) float64 CPU: the setting `name` (its element `index`, for betas) of each parameter's
    group. `groups`: a batch's distinct param groups; `where` (T,) int64: each parameter's among
    them. Settings may be floats or one-element tensors (a tensor lr, for torch.compile under an LR
    scheduler; on any device)."""
    values = [torch.as_tensor(g[name] if index is None else g[name][index], dtype=torch.float64).cpu().reshape(())
              for g in groups]
    return torch.stack(values)[where]


def check_lr(lr: float | torch.Tensor) -> None:
    """torch.optim's checks of a learning rate: a float or a one-element tensor, not negative (nor NaN)."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def draw_seed() -> int:
    """A seed from torch's default generator (so torch.manual_seed makes it reproducible)."""
    return int(torch.randint(0, MAX_SEED - 1, (), dtype=torch.int64))


def _same_on_every_rank(seed: int) -> int:
    """Rank 0's seed when torch.distributed runs: ranks seeded differently (for data
    augmentation, say) would otherwise round differently and DDP replicas would drift."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = box[0]
    return seed


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class StochasticRoundingOptimizer(torch.optim.Optimizer, metaclass=abc.ABCMeta):
    """Base of tlcore.optim.AdamW and SGD (see the module docstring)."""

    # GradScaler then hands over grad_scale / found_inf instead of unscaling the grads
    # itself (which it refuses to do for fp16 grads); the scale is folded into the update.
    _step_supports_amp_scaling = True
    _op_name = ""  # "tlcore.optim.X", for error messages
    _STATE_KEYS: tuple[str, ...] = ()  # every per-parameter state a subclass may keep, "step" aside

    def __init__(self, params, defaults: dict[str, Any], *, stochastic_rounding: bool, seed: Optional[int],
                 state_dtype: Optional[torch.dtype]):
        if seed is None:
            seed = _same_on_every_rank(draw_seed())
        defaults = dict(defaults, stochastic_rounding=bool(stochastic_rounding), seed=seed, state_dtype=state_dtype)
        self._check_group(defaults)
        defaults["seed"] = int(seed)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Refuse the group settings the op cannot run (before any parameter is touched)."""
        for name in OFF_ONLY_OPTIONS:
            if group.get(name):
                raise NotImplementedError(f"{self._op_name}: {name}=True is not implemented")
        seed = group["seed"]
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < MAX_SEED:
            raise ValueError(f"{self._op_name}: seed must be an int in [0, 2**63), got {seed!r}")
        if group.get("decoupled_weight_decay") is False and group.get("weight_decay"):
            raise ValueError(f"{self._op_name}: this group's weight decay is L2 (torch.optim.Adam's), not decoupled")
        if group["state_dtype"] is not None and group["state_dtype"] not in STATE_DTYPES:
            raise ValueError(f"{self._op_name}: state_dtype must be None, torch.float32 or torch.bfloat16, got "
                             f"{group['state_dtype']} (fp16 states cannot hold squared gradients' range)")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's, with the group's tlcore settings checked first (a bad group is not added) and a
        parameter listed twice in it refused (torch.optim only warns): one fused launch would update its
        two entries at once, from the same step count, racing on the same memory."""
        self._check_group({**self.defaults, **param_group})
        params = param_group["params"]
        if not isinstance(params, set):  # (torch.optim refuses sets itself)
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            tensors = [p[1] if isinstance(p, tuple) else p for p in params]  # (named parameters come as pairs)
            if len({id(t) for t in tensors}) != len(tensors):
                raise ValueError(f"{self._op_name}: a parameter is listed more than once in one param group; "
                                 "list each parameter once")
            param_group = dict(param_group, params=params)
        if "seed" in param_group:
            param_group = dict(param_group, seed=int(param_group["seed"]))
        super().add_param_group(param_group)

    # ---- what a subclass provides ----

    @abc.abstractmethod
    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        """Names of the per-parameter state tensors, in the op's argument order."""

    @abc.abstractmethod
    def _hyper(self, groups: list[dict[str, Any]], where: torch.Tensor, steps: torch.Tensor,
               inv_scale: float) -> torch.Tensor:
        """The op's (T, 8) hyper-parameters (float64) of T parameters at `steps` ((T,) int64), each
        in groups[where[i]] (group_values)."""

    def _batch_key(self, group: dict[str, Any]) -> tuple:
        """Extra group settings that must be equal within one fused launch."""
        return ()

    @abc.abstractmethod
    def _launch(self, key: tuple, tensors: list[list[torch.Tensor]], hyper: torch.Tensor, counters: torch.Tensor,
                seed: int, stochastic: bool) -> None:
        """One fused op call over `tensors` (params, grads, then each state list)."""

    # ---- the step ----

    def _amp_inv_scale(self) -> Optional[float]:
        """1 / GradScaler's scale (1.0 without one), or None when the scaler found inf/NaN grads."""
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None and grad_scale is None:
            return 1.0
        # one host sync for both (the step needs them on the host to skip or to fill the table)
        # (found_inf is the int 0 when the scaler saw no gradients at all)
        values = torch.stack([torch.as_tensor(t, dtype=torch.float32).reshape(()).cpu()
                              for t in (found_inf, grad_scale) if t is not None])
        if found_inf is not None and values[0].item() != 0:
            return None
        return 1.0 / values[-1].item() if grad_scale is not None else 1.0

    def _check_grad(self, p: torch.Tensor, grad: torch.Tensor, position: int) -> torch.Tensor:
        """p's gradient as the op takes it (p's strides), or a clear error for what the op cannot update."""
        if grad.is_sparse:
            raise RuntimeError(f"{self._op_name} does not support sparse gradients (parameter {position})")
        if grad.is_complex() or p.is_complex():
            raise RuntimeError(f"{self._op_name} does not support complex parameters or gradients "
                               f"(parameter {position}); view them as real with torch.view_as_real")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{self._op_name}: parameter {position} has dtype {p.dtype}; supported are fp32, bf16, "
                            "fp16 (leave the others to a torch.optim optimizer of their own)")
        if grad.dtype != p.dtype:
            raise TypeError(f"{self._op_name}: parameter {position} is {p.dtype} but its gradient is {grad.dtype}")
        if grad.stride() != p.stride():  # the kernels pair elements by memory position
            grad = torch.empty_like(p).copy_(grad)
        return grad

    def _check_state_shapes(self, group: dict[str, Any], p: torch.Tensor, position: int) -> None:
        for name in self._state_names(group):
            value = self.state.get(p, {}).get(name)
            if value is not None and value.shape != p.shape:
                raise ValueError(f"{self._op_name}: state {name!r} of parameter {position} has shape "
                                 f"{tuple(value.shape)}, the parameter {tuple(p.shape)} (a state_dict of another model?)")

    def _init_state(self, group: dict[str, Any], p: torch.Tensor, local: torch.Tensor, state: dict[str, Any]) -> bool:
        """Create the states `p` lacks (all on its first step; SGD's momentum buffer also when
        momentum is switched on later); True if any was created (the op then starts it fresh).

        States from elsewhere (a torch.optim state_dict's fp16 states of fp16 parameters; a
        parameter since moved to channels_last or to another device) are copied to the dtype, device
        and memory layout the op takes (exactly, but for fp32 states made bf16): its kernels pair
        elements by memory position.
        The step count stays a CPU tensor (a loop moving the optimizer's state to a GPU moves it too).
        """
        dtype = group["state_dtype"] or default_state_dtype(p.dtype)
        step = state.get("step")
        if step is None or step.device.type != "cpu":
            state["step"] = new_step_count(0 if step is None else int(step))
        fresh = False
        for name in self._state_names(group):
            value = state.get(name)
            if value is None:  # (torch.optim.SGD saves a momentum_buffer of None)
                state[name] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                fresh = True
            elif value.dtype != dtype or value.device != p.device or _local(value).stride() != local.stride():
                state[name] = torch.empty_like(p, dtype=dtype).copy_(value)
        return fresh

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's loading (its load_state_dict hooks included), except that:

        - states keep their saved dtype: torch.optim casts floating-point states to their
          parameter's dtype, which would squeeze the fp32 states of fp16 parameters into fp16;
        - a torch.optim.AdamW / SGD state_dict loads too: its groups get this optimizer's tlcore
          settings (seed, stochastic_rounding, state_dtype), its float steps become int64 ones;
        - the groups are checked before anything is loaded: another algorithm's state_dict (SGD's
          into AdamW, NAdam's, torch.optim.Adam's with L2 weight decay) is refused where its
          settings or states tell it apart (an Adam saved before torch recorded
          decoupled_weight_decay does not).

        Both happen in hooks of their own around the user's: the checks and the saved states are
        those of the state_dict the user's pre-hooks hand over, and the user's post-hooks see the
        states as loaded.
        """
        loading: list[dict[str, Any]] = []

        def check(optimizer, final_state_dict):
            self._check_loadable(final_state_dict)
            loading.append(final_state_dict)

        def keep_saved_states(optimizer):
            self._restore_saved_states(loading[-1])

        hooks = [self.register_load_state_dict_pre_hook(check),  # (after the user's)
                 self.register_load_state_dict_post_hook(keep_saved_states, prepend=True)]  # (before theirs)
        try:
            super().load_state_dict(state_dict)
        finally:
            for hook in hooks:
                hook.remove()

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        """Refuse a state_dict whose groups or states tell that another optimizer saved it."""
        own = set(self.defaults) - set(OFF_ONLY_OPTIONS) - {"seed", "stochastic_rounding", "state_dtype"}
        for saved in state_dict["param_groups"]:
            if own - set(saved):
                raise ValueError(f"{self._op_name}: the state_dict's param groups lack {sorted(own - set(saved))}: "
                                 "it is another optimizer's")
            self._check_group({**self.defaults, **saved})
        foreign = {name for state in state_dict["state"].values() for name in state} - {"step", *self._STATE_KEYS}
        if foreign:  # (e.g. NAdam's mu_product, Adamax's exp_inf: an algorithm with AdamW's settings)
            raise ValueError(f"{self._op_name}: the state_dict holds states {sorted(foreign)}: it is another optimizer's")

    def _restore_saved_states(self, state_dict: dict[str, Any]) -> None:
        """After torch.optim's loading: the states in their saved dtypes, int64 step counts, and this
        optimizer's defaults in groups that lack them (a torch.optim state_dict's)."""
        for group in self.param_groups:
            for name, value in self.defaults.items():
                group.setdefault(name, value)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            for name, value in state_dict["state"].get(saved_id, {}).items():
                if name == "step":  # (an int in checkpoints of tlcore before 2026-11-22)
                    self.state[p]["step"] = new_step_count(int(value))
                elif torch.is_tensor(value):
                    self.state[p][name] = value.to(device=p.device)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One optimizer step; a GradScaler step with inf/NaN gradients is skipped entirely."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        inv_scale = self._amp_inv_scale()
        if inv_scale is None:
            return loss
        # Check every group and parameter before touching any state: a bad one must not leave a half step.
        for group in self.param_groups:
            self._check_group(group)
        todo = []
        position = -1
        for group_index, group in enumerate(self.param_groups):
            for p in group["params"]:
                position += 1
                if p.grad is None:
                    continue
                local = _local(p)
                if not is_dense(local):
                    raise ValueError(f"{self._op_name}: parameter {position} (strides {local.stride()}) is not "
                                     "dense; tlcore optimizers need dense parameters")
                grad = self._check_grad(local, _local(p.grad), position)
                self._check_state_shapes(group, p, position)
                todo.append((group_index, p, local, grad, position))
        if not todo:  # (no gradient at all: nothing to do, as in torch.optim)
            return loss
        batches: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for group_index, p, local, grad, position in todo:
            group = self.param_groups[group_index]
            state = self.state[p]
            new = self._init_state(group, p, local, state)
            states = [_local(state[name]) for name in self._state_names(group)]
            key = (local.device, local.dtype, states[0].dtype if states else None,
                   group["seed"], group["stochastic_rounding"]) + self._batch_key(group)
            batch = batches[key]
            batch["params"].append(local)
            batch["grads"].append(grad)
            batch["states"].append(states)
            if batch["groups"][-1:] != [group_index]:  # (parameters come group by group; indices, as
                batch["groups"].append(group_index)  # torch 2.6's Dynamo cannot compare dicts with `is`)
            batch["steps"].append(state["step"])
            batch["counters"].append([len(batch["groups"]) - 1, position, int(new)])
        for key, batch in batches.items():
            states = [list(column) for column in zip(*batch["states"])]
            steps = torch.stack(batch["steps"]) + 1
            where, position, new = torch.tensor(batch["counters"], dtype=torch.int64).unbind(1)
            groups = [self.param_groups[i] for i in batch["groups"]]
            self._launch(key, [batch["params"], batch["grads"]] + states,
                         self._hyper(groups, where, steps, inv_scale).float(),
                         torch.stack([position, steps, new], 1), key[3], key[4])
        torch._foreach_add_([self.state[p]["step"] for _, p, _, _, _ in todo], 1)
        return loss
