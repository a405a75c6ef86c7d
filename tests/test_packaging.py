"""`pip install tlcore-<version>.tar.gz` works: the source distribution carries every file the
build and the tests read, and the wheel built from it holds both packages (tlcore, and
tlcore.kernels from kernels/)."""
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_SUFFIXES = {".py", ".h", ".cpp", ".cu", ".cuh"}


def _build(kind, source_dir, out_dir):
    """Run setuptools' PEP 517 hook `build_<kind>` in `source_dir`, as pip does; returns the file.

    TLCORE_BUILD_EXT=0: the wheel is checked for its Python packages, so the C++ build is skipped.
    """
    hook = f"import sys; from setuptools import build_meta; print(build_meta.build_{kind}(sys.argv[1]))"
    env = {**os.environ, "TLCORE_BUILD_EXT": "0"}
    done = subprocess.run([sys.executable, "-c", hook, str(out_dir)], cwd=source_dir, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out_dir / done.stdout.strip().splitlines()[-1]


def _clean_tree(destination):
    """A copy of the source tree as a fresh checkout has it: setuptools also packs the files listed
    in an old tlcore.egg-info/SOURCES.txt, which would hide a file missing from the manifest."""
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", ".hypothesis", ".pytest_cache")
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, destination / name)
    for folder in ("csrc", "kernels", "tlcore", "tests"):
        shutil.copytree(ROOT / folder, destination / folder, ignore=skip)
    return destination


def _sources(folder):
    return {path.relative_to(ROOT).as_posix() for path in (ROOT / folder).rglob("*")
            if path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts}


def test_sdist_builds_a_wheel_with_both_packages(tmp_path):
    (tmp_path / "checkout").mkdir()
    sdist = _build("sdist", _clean_tree(tmp_path / "checkout"), tmp_path)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    unpacked = tmp_path / sdist.name.removesuffix(".tar.gz")
    packed = {path.relative_to(unpacked).as_posix() for path in unpacked.rglob("*")}
    wanted = set().union(*(_sources(folder) for folder in ("csrc", "kernels", "tlcore", "tests")))
    assert "csrc/cpu/int8_cpu.h" in wanted and "csrc/cuda/int8_conv.cu" in wanted  # (the scan reads what it should)
    assert not wanted - packed, f"the sdist lacks {sorted(wanted - packed)}"

    wheel = _build("wheel", unpacked, tmp_path / "wheel")
    installed = tmp_path / "installed"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(installed)
    probe = ("import tlcore, tlcore.kernels.implicit_gemm as k; "
             "print(tlcore.__file__); print(k.__file__); print(callable(tlcore.fuse))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(installed)})
    assert done.returncode == 0, done.stderr[-3000:]
    package, kernels, has_fuse = done.stdout.strip().splitlines()[-3:]
    assert Path(package).is_relative_to(installed) and Path(kernels).is_relative_to(installed / "tlcore" / "kernels")
    assert has_fuse == "True"
