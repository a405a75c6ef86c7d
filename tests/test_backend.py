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
    with pytest.raises(ValueError, match="unknown tlcore backend 'tpu'"):
        backend.forced()


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
