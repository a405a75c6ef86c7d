"""Every `tlcore.ops.<name>` that an error message, docstring or comment of the package points users to
exists: a module of tlcore.ops or a name tlcore.ops exports."""
import importlib
import pathlib
import re

import tlcore
import tlcore.ops


def test_named_ops_exist():
    package = pathlib.Path(tlcore.__file__).parent
    sources = list(package.rglob("*.py")) + list(package.parent.joinpath("kernels").glob("*.py"))
    named = {name for path in sources for name in re.findall(r"\btlcore\.ops\.(\w+)", path.read_text())}
    assert "requantization" in named  # (the scan reads what it should)
    missing = []
    for name in sorted(named):
        if not hasattr(tlcore.ops, name):
            try:
                importlib.import_module(f"tlcore.ops.{name}")
            except ModuleNotFoundError:
                missing.append(name)
    assert not missing, f"tlcore.ops has no {missing}"
