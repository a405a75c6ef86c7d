"""Loads tlcore's optional compiled extension (`tlcore._C`).

The package works without it: ops that have a C++/CUDA kernel fall back to Triton
or PyTorch, and `require()` names the missing piece when a feature has no fallback.
"""
import logging

log = logging.getLogger("tlcore")

try:
    from tlcore import _C  # registers the torch.ops.tlcore._*_cpu / _*_cuda kernels
except (ImportError, OSError, RuntimeError) as error:  # not built, built against another torch, bad registration
    _C = None
    LOAD_ERROR: Exception | None = error
    log.info("tlcore: compiled extension not loaded (%s); using Triton/PyTorch paths", error)
else:
    LOAD_ERROR = None


def loaded() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA sources."""
    return _C is not None and bool(_C.WITH_CUDA)


def missing_reason() -> str:
    if LOAD_ERROR is not None:
        return f"tlcore's compiled extension failed to load ({LOAD_ERROR!r})"
    if _C is not None and not _C.WITH_CUDA:
        return ("tlcore's compiled extension was built without CUDA sources (at build time no CUDA toolkit "
                "of torch's CUDA major version was found, torch was a CPU-only build, or TLCORE_CUDA=0)")
    return ""


def require(feature: str, cuda: bool = False) -> None:
    """Raise a clear error if `feature` cannot run because the extension is missing."""
    if (has_cuda_kernels() if cuda else loaded()):
        return
    raise RuntimeError(
        f"{feature} needs {'the CUDA kernels of ' if cuda else ''}tlcore's compiled extension: "
        f"{missing_reason()}. Rebuild with `pip install --no-build-isolation -e .` "
        "(set CUDA_HOME to the toolkit folder holding lib64/libcudart.so for the CUDA kernels)."
    )
