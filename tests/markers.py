"""pytest marks shared by the test modules."""
import pytest

from tlcore import _extension

needs_extension = pytest.mark.skipif(not _extension.loaded(), reason="tlcore._C is not built")
