"""Backend selection, overrides and the compiled extension's presence."""
import warnings

import pytest
import torch

from tlcore import _extension, backend


def test_extension_is_built_and_loads():
    # CI installs with `pip install -e .`, so a broken build must fail here, not fall back silently.
    assert _extension.loaded(), _extension.missing_reason()


def test_defaults_per_device():
    implemented = ("triton", "cuda", "cpu", "torch")
    assert backend.select("op", torch.device("cpu"), implemented) == "cpu"
    assert backend.select("op", torch.device("cpu"), ("triton", "torch")) == "torch"


def test_context_manager_overrides_environment(monkeypatch):
    monkeypatch.setenv("TLCORE_BACKEND", "torch")
    assert backend.forced() == "torch"
    with backend.use_backend("cpu"):
        assert backend.forced() == "cpu"
        assert backend.select("op", torch.device("cpu"), ("cpu", "torch")) == "cpu"
    assert backend.forced() == "torch"


def test_context_manager_nests_and_reenters():
    """Inner blocks win and each exit restores the enclosing choice, also for one object entered twice."""
    cpu = backend.use_backend("cpu")
    with cpu:
        with backend.use_backend("torch"):
            assert backend.forced() == "torch"
        with cpu:
            with backend.use_backend(None):
                assert backend.forced() is None
            assert backend.forced() == "cpu"
        assert backend.forced() == "cpu"
    assert backend.forced() is None


def test_compiled_code_follows_use_backend():
    """Where Dynamo traces the context variable, a compiled caller re-traces when the block around it
    changes; elsewhere (torch 2.11) it compiles at all and keeps the backend it was traced with."""
    @torch.compile(backend="eager", fullgraph=True)
    def chosen(x):
        return x + (1 if backend.forced() == "torch" else 2)

    x = torch.zeros(1)
    with backend.use_backend("torch"):
        assert chosen(x).item() == 1
    assert chosen(x).item() == (2 if backend.DYNAMO_TRACES_CONTEXT_VARS else 1)


def test_unknown_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown tlcore backend"):
        with backend.use_backend("cudnn"):
            pass
    monkeypatch.setenv("TLCORE_BACKEND", "tpu")
    with pytest.raises(ValueError, match="TLCORE_BACKEND='tpu'; choose one of"):
        backend.forced()
    monkeypatch.setenv("TLCORE_BACKEND", "")  # set but empty: as if unset
    assert backend.forced() is None


def test_unusable_forced_backend_falls_back_and_warns_once():
    with backend.use_backend("cuda"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = backend.select("fallback_probe", torch.device("cpu"), ("cuda", "torch"))
        second = backend.select("fallback_probe", torch.device("cpu"), ("cuda", "torch"))
    assert first == second == "torch"
    messages = [str(w.message) for w in caught if "fallback_probe" in str(w.message)]
    assert len(messages) == 1 and "CUDA C++ kernels need a CUDA device" in messages[0]


def test_missing_kernel_for_forced_backend_is_named():
    with backend.use_backend("cpu"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backend.select("no_cpu_kernel_probe", torch.device("cpu"), ("triton", "torch")) == "torch"
    assert any("no_cpu_kernel_probe has no cpu kernel" in str(w.message) for w in caught)


def test_missing_extension_falls_back_with_one_message(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "LOAD_ERROR", ImportError("libtlcore broke"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert backend.select("ext_probe", torch.device("cpu"), ("cpu", "torch")) == "torch"
    messages = [str(w.message) for w in caught if "ext_probe" in str(w.message)]
    assert len(messages) == 1 and "libtlcore broke" in messages[0]
    with pytest.raises(RuntimeError, match="needs tlcore's compiled extension.*libtlcore broke"):
        _extension.require("INT8 on CPU")


# ---- select_fastest: the GPU backend measured fastest per call configuration ---------------------

GPU = torch.device("cuda", 0)
GPU_KERNELS = ("triton", "cuda", "torch")


@pytest.fixture
def timed_gpu(monkeypatch):
    """A pretend GPU with both GPU backends runnable, whose timing reports `speeds` (ms per backend);
    yields (speeds, the backends timed so far). No GPU is touched: launch() returns the backend's name."""
    monkeypatch.setattr(_extension, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(backend, "_fastest", {})
    monkeypatch.delenv("TLCORE_BACKEND", raising=False)
    monkeypatch.delenv(backend.TIMING_ENV, raising=False)
    speeds, timed = {"triton": 2.0, "cuda": 1.0}, []

    def median_ms(call, device):
        assert device == GPU
        name = call()
        timed.append(name)
        return speeds[name]

    monkeypatch.setattr(backend, "_median_ms", median_ms)
    return speeds, timed


def launch(name):
    return name


def test_select_fastest_times_each_gpu_backend_once_per_key(timed_gpu):
    speeds, timed = timed_gpu
    assert backend.select_fastest("op", GPU, GPU_KERNELS, ("shape", 1), launch) == "cuda"
    assert sorted(timed) == ["cuda", "triton"]
    speeds["cuda"] = 3.0  # a second call with the key reuses the first measurement
    assert backend.select_fastest("op", GPU, GPU_KERNELS, ("shape", 1), launch) == "cuda"
    assert len(timed) == 2
    assert backend.select_fastest("op", GPU, GPU_KERNELS, ("shape", 2), launch) == "triton"
    assert len(timed) == 4
    assert backend.fastest_choices() == {("op", GPU, ("shape", 1)): "cuda", ("op", GPU, ("shape", 2)): "triton"}


def test_traced_calls_reuse_a_choice_but_time_nothing(timed_gpu):
    _, timed = timed_gpu
    assert backend.select_fastest("op", GPU, GPU_KERNELS, ("shape",), None) == "triton"  # the default order
    assert backend.select_fastest("op", GPU, GPU_KERNELS, ("shape",), launch) == "cuda"
    assert backend.select_fastest("op", GPU, GPU_KERNELS, ("shape",), None) == "cuda"
    assert len(timed) == 2


@pytest.mark.parametrize("why", ["forced", "env off", "symbolic key", "one gpu kernel", "capturing", "cpu"])
def test_select_fastest_keeps_select_without_a_choice_to_make(timed_gpu, monkeypatch, why):
    _, timed = timed_gpu
    device, implemented, key, expected = GPU, GPU_KERNELS, ("shape",), "triton"
    if why == "forced":
        monkeypatch.setenv("TLCORE_BACKEND", "cuda")
        expected = "cuda"
    elif why == "env off":
        monkeypatch.setenv(backend.TIMING_ENV, "0")
    elif why == "symbolic key":
        key = None
    elif why == "one gpu kernel":
        implemented = ("triton", "torch")
    elif why == "capturing":
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    else:
        device, implemented = torch.device("cpu"), ("triton", "cuda", "cpu", "torch")
        expected = "cpu" if _extension.loaded() else "torch"
    unmeasured = backend.unmeasured_choices()
    assert backend.select_fastest("op", device, implemented, key, launch) == expected
    assert timed == [] and backend.fastest_choices() == {}
    assert backend.unmeasured_choices() == unmeasured + (why == "capturing")  # (a timing that measured nothing)


class CompilationError(Exception):
    """Like Triton's errors, not a RuntimeError."""


def test_a_kernel_failing_while_timed_is_not_chosen(timed_gpu):
    _, timed = timed_gpu

    def cuda_refuses(name):
        if name == "cuda":
            raise CompilationError("no kernel for this config")
        return name

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backend.select_fastest("refusing_probe", GPU, GPU_KERNELS, ("shape",), cuda_refuses) == "triton"
    assert timed == ["triton"]
    assert any("refusing_probe's cuda kernel failed while timed" in str(w.message) for w in caught)


def test_nothing_measured_is_not_kept(timed_gpu):
    """When every kernel fails while timed (say, no memory left for the timing), the call gets the
    default and the next call with the key tries again."""
    _, timed = timed_gpu
    failing = True

    def launch_unless_failing(name):
        if failing:
            raise RuntimeError("CUDA out of memory")
        return name

    unmeasured = backend.unmeasured_choices()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert backend.select_fastest("oom_probe", GPU, GPU_KERNELS, ("shape",), launch_unless_failing) == "triton"
    assert timed == [] and backend.fastest_choices() == {}
    assert backend.unmeasured_choices() == unmeasured + 1  # (what callers keeping a choice's plan look at)
    failing = False
    assert backend.select_fastest("oom_probe", GPU, GPU_KERNELS, ("shape",), launch_unless_failing) == "cuda"
    assert sorted(timed) == ["cuda", "triton"]
    assert backend.unmeasured_choices() == unmeasured + 1
