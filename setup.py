"""Build tlcore's optional compiled extension, `tlcore._C`.

The C++ CPU sources (csrc/cpu) are always built; the CUDA sources (csrc/cuda) are
built when a CUDA toolkit is found. Environment switches:

    TLCORE_BUILD_EXT=0   build no extension at all (pure Python + Triton install)
    TLCORE_CUDA=0|1      force the CUDA sources off / on (on fails loudly without a toolkit)
    CUDA_HOME            the toolkit folder, the one holding lib64/libcudart.so
    TORCH_CUDA_ARCH_LIST architectures to build for (default below when no GPU is visible)
    MAX_JOBS             parallel compile jobs (default: capped by cores and free memory)

If the extension is missing at run time, `import tlcore` still works and the ops
fall back to Triton or PyTorch with one message naming what is missing.
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Datacenter and workstation GPUs people run ResNets on: A100, A10/3090, L4/4090, H100/H200.
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
# One nvcc/cc1plus job over torch headers peaks near 3 GiB.
GIB_PER_JOB = 3


def _cuda_toolkit():
    """The CUDA toolkit folder that holds lib64/libcudart.so, or None.

    torch guesses the toolkit from nvcc's location, which is wrong when nvcc is a
    wrapper script (e.g. /usr/local/bin/nvcc) and makes the link fail.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for folder in candidates:
        if folder and os.path.exists(os.path.join(folder, "lib64", "libcudart.so")) \
                and os.path.exists(os.path.join(folder, "bin", "nvcc")):
            return folder
    return None


def _toolkit_mismatch(toolkit, torch_cuda):
    """Why the toolkit cannot build against this torch ('' if it can): a CPU-only torch has no
    CUDA libraries to link, and torch refuses a toolkit of another major version."""
    if torch_cuda is None:
        return "torch is a CPU-only build"
    try:
        out = subprocess.run([os.path.join(toolkit, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
        release = re.search(r"release (\d+)\.", out).group(1)
    except (OSError, subprocess.SubprocessError, AttributeError):
        return f"cannot run {toolkit}/bin/nvcc"
    if release != torch_cuda.split(".")[0]:
        return f"the CUDA toolkit in {toolkit} is CUDA {release}, torch was built with CUDA {torch_cuda}"
    return ""


def _default_jobs():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        avail_gib = int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        avail_gib = GIB_PER_JOB
    return max(1, min(os.cpu_count() or 1, int(avail_gib // GIB_PER_JOB)))


def _extensions():
    if os.environ.get("TLCORE_BUILD_EXT", "1") == "0":
        print("tlcore: TLCORE_BUILD_EXT=0, building no compiled extension")
        return [], {}
    want_cuda = os.environ.get("TLCORE_CUDA")
    toolkit = _cuda_toolkit() if want_cuda != "0" else None
    if want_cuda == "1" and toolkit is None:
        raise RuntimeError("TLCORE_CUDA=1 but no CUDA toolkit with lib64/libcudart.so was found; set CUDA_HOME")
    import torch

    if toolkit and want_cuda != "1":
        mismatch = _toolkit_mismatch(toolkit, torch.version.cuda)
        if mismatch:
            print(f"tlcore: {mismatch}: building the C++ CPU sources only (TLCORE_CUDA=1 forces CUDA)")
            toolkit = None
    if toolkit:
        os.environ["CUDA_HOME"] = toolkit  # must be set before torch.utils.cpp_extension is imported
    os.environ.setdefault("MAX_JOBS", str(_default_jobs()))
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"]  # torch adds the C++ standard its headers need
    if toolkit:
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        print(f"tlcore: building CUDA sources with the toolkit in {toolkit} "
              f"for {os.environ.get('TORCH_CUDA_ARCH_LIST', 'the visible GPU')}")
        ext = CUDAExtension(
            "tlcore._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("TLCORE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    else:
        print("tlcore: no CUDA toolkit found (or TLCORE_CUDA=0): building the C++ CPU sources only")
        ext = CppExtension(
            "tlcore._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(
    packages=find_packages(include=["tlcore", "tlcore.*"]) + ["tlcore.kernels"],
    package_dir={"tlcore": "tlcore", "tlcore.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
