"""Launching autotuned Triton kernels with less host time per call.

A `triton.autotune` launch spends about 55 us of Python per call on an H100 machine's host before
its JIT launcher (~60 us) runs: it binds every argument by name to compute the key and merges the
chosen config into the call. In eager mode ResNet-50 is host-bound at batch 256 (tlcore.fuse:
17.9 ms a forward against 9.9 ms as a CUDA graph; bench/NOTES.md, session 39), so each microsecond
per conv counts 53 times a forward. `launch_tuned` lets the autotuner tune a key's first call, then
launches the chosen config's JIT function directly. `TunedLaunch` goes one step further for a
launch plan's calls, which share their key and grid: it keeps the config and the grid themselves.
"""
import torch
import triton
from torch.library import wrap_triton
from triton.runtime.autotuner import Autotuner

from tlcore.ops.eager import traced

_chosen: dict[tuple, triton.Config] = {}  # (kernel, key) -> the config the autotuner chose
_key_positions: dict[Autotuner, list[tuple[int, str]]] = {}  # kernel -> (argument index, name) of its keys


def _tuning_key(kernel: Autotuner, args: tuple, kwargs: dict) -> tuple:
    """What the autotuner keys this call on: its key arguments' values, then the tensors' dtypes."""
    positions = _key_positions.get(kernel)
    if positions is None:
        positions = _key_positions[kernel] = [(kernel.arg_names.index(name), name) for name in kernel.keys]
    values = tuple(args[i] if i < len(args) else kwargs[name] for i, name in positions)
    return values + tuple(a.dtype for a in args if isinstance(a, torch.Tensor))


def launch_tuned(kernel: Autotuner, grid, *args, **kwargs) -> triton.Config | None:
    """`kernel[grid](*args, **kwargs)` for a triton.autotune'd kernel, minus the autotuner's per-call
    work once it has tuned this call's key. Returns the config it launched (None when traced).

    Traced (tlcore.ops.eager.traced) it goes through wrap_triton, so that the graph records the
    autotuned kernel. args: the kernel's leading arguments in order, a tensor among them; kwargs the rest
    by name (its key arguments among them).
    """
    if traced(next(a for a in args if isinstance(a, torch.Tensor))):
        wrap_triton(kernel)[grid](*args, **kwargs)
        return None
    entry = (kernel, _tuning_key(kernel, args, kwargs))
    config = _chosen.get(entry)
    if config is None:
        kernel[grid](*args, **kwargs)
        config = _chosen[entry] = kernel.best_config
        return config
    meta = config.all_kwargs()
    if config.pre_hook is not None:  # (as the autotuner does: e.g. TMA descriptors' boxes for this config)
        config.pre_hook(_named_arguments(kernel, args, kwargs, meta))
    kernel.fn[grid](*args, **kwargs, **meta)
    return config


def _named_arguments(kernel: Autotuner, args: tuple, kwargs: dict, meta: dict) -> dict:
    """A call's arguments by name, with a config's meta-parameters: what pre-hooks and grids get."""
    return {**dict(zip(kernel.arg_names, args)), **kwargs, **meta}


class TunedLaunch:
    """Launches of an autotuned kernel for calls that differ only in their tensors' data (a launch
    plan's: same sizes, strides and constants, so the same tuning key and grid). The first call goes
    through launch_tuned; later ones launch the config it chose on the grid computed then, without
    recomputing the key or the grid."""

    def __init__(self, kernel: Autotuner, grid):
        self._kernel, self._grid = kernel, grid
        self._config: triton.Config | None = None
        self._launch = None  # the chosen config's JIT function on its grid
        self._meta: dict = {}  # the chosen config's meta-parameters and launch options

    def __call__(self, *args, **kwargs) -> None:
        config = self._config
        if config is None:
            config = launch_tuned(self._kernel, self._grid, *args, **kwargs)
            if config is not None:  # (traced: nothing to keep)
                self._config, self._meta = config, config.all_kwargs()
                grid = self._grid(_named_arguments(self._kernel, args, kwargs, self._meta)) if callable(self._grid) \
                    else self._grid
                self._launch = self._kernel.fn[grid]
            return
        if config.pre_hook is not None:
            config.pre_hook(_named_arguments(self._kernel, args, kwargs, self._meta))
        self._launch(*args, **kwargs, **self._meta)
