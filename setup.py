"""Build and install pyalign; the C++/CUDA extension pyalign._C is built by CMake.

The extension compiles against the torch that is already installed, so build without isolation:

    pip install --no-build-isolation -e .      # editable, as `make build` does
    pip install --no-build-isolation .

CMake's build tree is kept under build/cmake-<python>-<platform>/, so a rebuild after editing a
source file recompiles only that file. Environment knobs:
    PYALIGN_BUILD_JOBS=N        parallel compile jobs (default: the CPU count, at most 8)
    PYALIGN_NO_CUDA=1           skip the CUDA kernels even where torch has CUDA and nvcc exists
    TORCH_CUDA_ARCH_LIST="9.0"  GPU architectures (default: the visible GPU's, else 9.0 = H100)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources are built by the CMakeLists.txt at the repository root."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _import_torch():
    try:
        import torch  # noqa: PLC0415
    except ImportError as err:
        raise RuntimeError(
            "pyalign's extension builds against an installed torch, and `import torch` failed "
            f"({err}). Install torch first (e.g. `pip install torch==2.13.0`, or the CUDA "
            "build you use), then install pyalign with "
            "`pip install --no-build-isolation -e .` so the build sees that torch "
            "(build isolation would hide it)."
        ) from err
    return torch


def _cmake_executable() -> str:
    found = shutil.which("cmake")
    if found:
        return found
    try:
        import cmake  # noqa: PLC0415  (the PyPI package ships a binary)
    except ImportError as err:
        raise RuntimeError("building pyalign needs CMake >= 3.21: install it (apt, or "
                           "`pip install cmake`) and retry") from err
    return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")


def _cuda_arch_list(torch) -> str:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.version.cuda and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "9.0"  # H100 / H200


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        torch = _import_torch()
        cmake = _cmake_executable()
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}-{sysconfig.get_platform()}"
        build_dir.mkdir(parents=True, exist_ok=True)

        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYALIGN_OUTPUT_DIR={build_dir / 'lib'}",
            f"-DPYALIGN_TORCH_CUDA={torch.version.cuda or ''}",
            f"-DPYALIGN_ENABLE_CUDA={'OFF' if os.environ.get('PYALIGN_NO_CUDA') else 'ON'}",
            f"-DTORCH_CUDA_ARCH_LIST={_cuda_arch_list(torch)}",
            f"-DPYALIGN_TORCH_DIR={Path(torch.__file__).resolve().parent}",
            f"-DPYALIGN_TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        ]
        # A build tree remembers its generator; pick one only for a fresh tree.
        if not (build_dir / "CMakeCache.txt").exists() and shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        jobs = os.environ.get("PYALIGN_BUILD_JOBS") or str(min(8, os.cpu_count() or 1))
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--config", "Release", "-j", jobs],
                       check=True)
        # CMake writes into its own tree (a fixed path, so re-running it relinks nothing);
        # setuptools wants the module at `output` (build/lib*, or the source tree in place).
        built = build_dir / "lib" / output.name
        if not built.exists():
            raise RuntimeError(f"CMake finished but did not write {built}")
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, output)


# Name, version, dependencies and extras are in pyproject.toml ([project]); this file adds what
# only code can say: the CMake-built extension and the Triton kernels' package folder.
setup(
    packages=find_packages(include=["pyalign", "pyalign.*"]) + ["pyalign.kernels"],
    package_dir={"pyalign.kernels": "kernels"},
    ext_modules=[CMakeExtension("pyalign._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
