"""pytest marks and skips shared by the test modules."""
import contextlib

import pytest

from tlcore import _extension

needs_extension = pytest.mark.skipif(not _extension.loaded(), reason="tlcore._C is not built")


@contextlib.contextmanager
def triton_kernels_or_skip():
    """Skip the whole test module when its Triton kernels cannot be defined here: Triton 3.2's
    autotuner asks for a GPU driver when a kernel is decorated (torch 2.6's Triton, on a CPU machine)."""
    try:
        yield
    except RuntimeError as error:
        if "active drivers" not in str(error):
            raise
        pytest.skip(f"the Triton kernels cannot be defined without a GPU here: {error}", allow_module_level=True)
