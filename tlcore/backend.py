"""Which kernel implementation an op runs: backend selection and overrides.

Backends:
    triton  Triton kernels (CUDA tensors; CPU tensors too under TRITON_INTERPRET=1)
    cuda    CUDA C++ kernels of the compiled extension
    cpu     C++ CPU kernels of the compiled extension
    torch   a reference path in plain PyTorch ops (always available)

By default CUDA tensors go to Triton (then CUDA C++, then PyTorch) and CPU tensors go
to the C++ CPU kernels (then PyTorch). `TLCORE_BACKEND=<name>` or the `use_backend`
context manager forces one; when the forced backend cannot run an op (the op has no
such kernel, the device does not fit, the extension is missing) the op falls back to
its default and says so once.

An op with kernels on more than one GPU backend (the int8 conv: Triton and CUDA C++) may
instead call `select_fastest`: where nothing is forced, each call configuration (shapes,
strides, flags) is timed once on every GPU backend that can run it, and the fastest runs it
from then on, as cuDNN's benchmark mode does for its algorithms. The backends give
bit-identical results, so the choice changes speed only. `TLCORE_BACKEND_TIMING=0` turns
this off (the default order then applies).
"""
import contextvars
import functools
import os
import warnings
from collections.abc import Callable, Collection, Hashable, Mapping

import torch
from torch._dynamo import source as _dynamo_source

from tlcore import _extension

BACKENDS = ("triton", "cuda", "cpu", "torch")
_DEFAULT_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
TIMING_ENV = "TLCORE_BACKEND_TIMING"
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("tlcore_backend", default=None)
_warned: set[tuple[str, str, str]] = set()
# select_fastest's measured choices: (op, device, call key) -> backend.
_fastest: dict[tuple[str, torch.device, Hashable], str] = {}
# How many times fastest_of timed nothing (unmeasured_choices).
_unmeasured = 0


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown tlcore backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


class use_backend:  # noqa: N801 (used like a function: `with use_backend("cpu"):`)
    """Force every tlcore op inside the block to run on backend `name` (None: default).

    torch.compile re-traces a model when the block around its call changes; with a torch whose
    Dynamo cannot trace context variables (e.g. 2.11), it keeps the backend in force when it
    first traced (enter the block around the first call, or set TLCORE_BACKEND).

    A plain class rather than contextlib.contextmanager: quantized modules enter it on every
    forward, and the generator version cost ~1 us each time.
    """

    def __init__(self, name: str | None):
        self._name = None if name is None else _check_name(name)
        self._tokens: list[contextvars.Token] = []  # one per (nested) entry

    def __enter__(self) -> None:
        self._tokens.append(_override.set(self._name))

    def __exit__(self, *exc_info) -> None:
        _override.reset(self._tokens.pop())


# Whether Dynamo traces ContextVar.get (and guards on its value): torch 2.15's does; 2.11's raises
# (fullgraph compiles of tlcore models failed there), and 2.6's cannot either.
DYNAMO_TRACES_CONTEXT_VARS = hasattr(_dynamo_source, "ContextVarGetSource")


@torch.compiler.assume_constant_result
def _override_when_traced() -> str | None:
    """use_backend's choice where Dynamo cannot trace it: read once, when torch.compile traces."""
    return _override.get()


def forced() -> str | None:
    """The backend forced by `use_backend` or, failing that, by TLCORE_BACKEND."""
    name = _override.get() if DYNAMO_TRACES_CONTEXT_VARS else _override_when_traced()
    if name is not None:
        return name  # (use_backend checked it)
    name = os.environ.get("TLCORE_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"TLCORE_BACKEND={name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _why_not(backend: str, device: torch.device) -> str:
    """Why `backend` cannot run on `device` ('' if it can)."""
    if backend == "triton":
        if device.type == "cuda" or (device.type == "cpu" and interpreting()):
            return ""
        return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"CUDA C++ kernels need a CUDA device, got {device.type}"
        return "" if _extension.has_cuda_kernels() else _extension.missing_reason()
    if backend == "cpu":
        if device.type != "cpu":
            return f"C++ CPU kernels need CPU tensors, got {device.type}"
        return "" if _extension.loaded() else _extension.missing_reason()
    return ""


def select(op: str, device: torch.device, implemented: Collection[str]) -> str:
    """The backend op `op` runs on for tensors on `device`.

    `implemented` lists the backends the op has kernels for; "torch" must be one.
    """
    wanted = forced()
    if wanted is not None:
        reason = _why_not(wanted, device) if wanted in implemented else f"{op} has no {wanted} kernel"
        if not reason:
            return wanted
        _warn_once((op, wanted, device.type),
                   f"tlcore: backend {wanted!r} requested but {reason}; {op} uses its default backend")
    for backend in _DEFAULT_ORDER.get(device.type, ()):
        if backend not in implemented:
            continue
        reason = _why_not(backend, device)
        if not reason:
            return backend
        if backend in ("cpu", "cuda"):  # the op has a compiled kernel for this device, but no extension
            _warn_once((op, backend, device.type), f"tlcore: {op} falls back from its {backend} kernel: {reason}")
    return "torch"


def select_fastest(op: str, device: torch.device, implemented: Collection[str], key: Hashable | None,
                   launch: Callable[[str], object] | None) -> str:
    """`select`'s backend, or, where it has a choice to make, the GPU backend measured fastest.

    The choice is made where nothing is forced, `device` is a GPU and more than one of the op's GPU
    backends can run there: the first call with a given `key` times `launch(backend)` (a call of the
    op on that backend, on this call's tensors) on each of them and keeps the fastest; later calls
    with that key reuse it, traced ones included (torch.compile runs the op's body on functional
    tensors: pass launch=None for tensors that are not plain ones). key: None where there is nothing
    to time (symbolic shapes, CPU tensors). While a CUDA graph is being captured nothing is timed.
    """
    if key is None or device.type != "cuda" or forced() is not None or os.environ.get(TIMING_ENV) == "0":
        return select(op, device, implemented)
    entry = (op, device, key)
    chosen = _fastest.get(entry)
    if chosen is not None:  # every call but a configuration's first ends here
        return chosen
    default = select(op, device, implemented)
    candidates = [name for name in _DEFAULT_ORDER["cuda"]
                  if name != "torch" and name in implemented and not _why_not(name, device)]
    if len(candidates) < 2 or launch is None:
        return default
    return fastest_of(entry, {name: functools.partial(launch, name) for name in candidates}, device) or default


def fastest_of(entry: tuple[str, torch.device, Hashable], candidates: Mapping[str, Callable[[], object]],
               device: torch.device) -> str | None:
    """The name of the fastest of `candidates` (calls of op entry[0], one per kernel, on one call's
    tensors), timed on `device` the first time `entry` comes and remembered; None where nothing could
    be timed (while a CUDA graph is being captured, or every candidate failed): the caller's default
    runs, and the next call tries again. A candidate that raises is no candidate, with a warning."""
    global _unmeasured
    chosen = _fastest.get(entry)
    if chosen is not None:
        return chosen
    if torch.cuda.is_current_stream_capturing():
        _unmeasured += 1
        return None
    times = {}
    for name, call in candidates.items():
        try:
            times[name] = _median_ms(call, device)
        except Exception as error:  # noqa: BLE001 - a kernel refusing the call (Triton's errors too) is no candidate
            _warn_once((entry[0], name, "timing"), f"tlcore: {entry[0]}'s {name} kernel failed while timed, so it "
                                                   f"was not chosen: {type(error).__name__}: {error}", stacklevel=5)
    if not times:  # nothing measured (e.g. out of memory for the timing)
        _unmeasured += 1
        return None
    _fastest[entry] = min(times, key=times.get)
    return _fastest[entry]


def unmeasured_choices() -> int:
    """How many times fastest_of has timed nothing so far: a caller that keeps what it derived from a
    choice (a launch plan) keeps it only if this count did not change meanwhile, so that the next call
    times again."""
    return _unmeasured


def fastest_choices() -> dict[tuple[str, torch.device, Hashable], str]:
    """A copy of select_fastest's choices so far: (op, device, call key) -> backend."""
    return dict(_fastest)


def _median_ms(call: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of call() on `device` (CUDA events, L2 flushed between runs); short (~30 ms):
    a model's first forward times each of its conv configurations on two backends."""
    from triton.testing import do_bench

    with torch.cuda.device(device):  # do_bench's events and L2 flush use the current device
        return float(do_bench(call, warmup=5, rep=20, return_mode="median"))


def _warn_once(key: tuple[str, str, str], message: str, stacklevel: int = 4) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=stacklevel)
