"""Installs the aegan_fast package, its console scripts and the native extension aegan_fast._C.

Install without build isolation so the extension builds against the torch that is already
installed: ``pip install -e . --no-build-isolation`` (``make setup`` does this).

The extension:
- always: the CPU kernels, csrc/*.cpp (C++17, OpenMP, -O3), as a torch CppExtension;
- when the installed torch has CUDA (torch.version.cuda) and a CUDA toolkit is found (CUDA_HOME) and
  csrc/cuda/ holds sources: a CUDAExtension instead, adding csrc/cuda/*.cu and csrc/cuda/*.cpp and
  defining AEGAN_WITH_CUDA. The CUDA sources plug into the module by defining
  ``void aegan_fast_bind_cuda(pybind11::module_&)`` (see csrc/bindings.cpp).
Set AEGAN_NO_CUDA=1 to force the CPU-only build.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

CLIS = {
    "aegan-train": "aegan_fast.train:main",
    "aegan-sample": "aegan_fast.sample:main",
    "aegan-doctor": "aegan_fast.doctor:main",
    "aegan-eval": "aegan_fast.eval:main",
    "aegan-export": "aegan_fast.export.cli:main",
    "aegan-data": "aegan_fast.data.__main__:main",
}


def _rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def native_extensions():
    """(ext_modules, cmdclass) for aegan_fast._C. Without torch there is nothing to build against:
    that is an error, not a quiet install without the fast CPU kernels (pip's build isolation, or
    the deprecated `setup.py develop` path, hides the installed torch)."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        raise SystemExit("aegan_fast: building the native extension needs torch installed first; install torch, "
                         "then `pip install -e . --no-build-isolation` (or `make setup`)") from None
    sources = _rel("csrc/*.cpp")
    if not sources:
        return [], {}
    depends = _rel("csrc/*.h")
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
    cuda_sources = _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
    use_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and bool(cuda_sources)
                and os.environ.get("AEGAN_NO_CUDA", "0") != "1")
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "aegan_fast._C", sources + cuda_sources,
            depends=depends + _rel("csrc/cuda/*.h") + _rel("csrc/cuda/*.cuh"),
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=[("AEGAN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "aegan_fast._C", sources, depends=depends, include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = native_extensions()

setup(
    name="aegan_fast",
    version="0.1.0",
    description="A fast PyTorch engine for AEGAN (auto-embedding GANs)",
    python_requires=">=3.10",
    # kernels/ (the Triton kernels) is installed as the subpackage aegan_fast.kernels.
    packages=find_packages(include=["aegan_fast", "aegan_fast.*"]) + ["aegan_fast.kernels"],
    package_dir={"aegan_fast.kernels": "kernels"},
    package_data={"aegan_fast": ["_C.pyi", "py.typed"]},
    # torch is not pinned here: CPU users get it from `make setup` (pinned), GPU users install the
    # CUDA build of their choice first (see README).
    install_requires=["torch>=2.5", "numpy", "pillow", "tqdm", "matplotlib"],
    entry_points={"console_scripts": [f"{name}={target}" for name, target in CLIS.items()]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
