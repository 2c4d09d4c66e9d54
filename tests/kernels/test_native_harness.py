"""The native CPU engine's C++ exactness harness (tests/kernels/native_harness), natively and for AArch64.

``run.sh native`` builds kernels/native_src as kernels/native.py does and checks every instruction
set this CPU runs (x86 CI: scalar, popcnt, avx2, and avx512 where the CPU has AVX-512 VPOPCNTDQ)
against the harness's scalar reference.  ``run.sh aarch64`` cross-compiles the same and runs it
under qemu-aarch64, the only place the NEON kernels run on an x86 machine; it is skipped unless
the cross compiler and qemu are installed (Debian: ``apt-get install g++-aarch64-linux-gnu
qemu-user-static``).
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "native_harness" / "run.sh"
SUMMARY = re.compile(r"^native harness: (\S+): (\d+) checks, (\d+) mismatches$", re.M)


def _native_compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _run(target: str) -> list[str]:
    if shutil.which("bash") is None:
        pytest.skip("bash not found")
    result = subprocess.run(["bash", str(SCRIPT), target], capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    summary = SUMMARY.search(result.stdout)
    assert result.returncode == 0 and summary and summary.group(3) == "0", f"run.sh {target} failed:\n{output}"
    assert int(summary.group(2)) > 1000, output
    return summary.group(1).split(",")


def test_harness_native():
    if _native_compiler() is None:
        pytest.skip("no C++ compiler (set CXX, or install g++ or clang++)")
    isas = _run("native")
    assert "scalar" in isas
    if platform.machine().lower() in ("aarch64", "arm64"):
        assert "neon" in isas


def test_harness_aarch64_under_qemu():
    cxx = os.environ.get("AARCH64_CXX", "aarch64-linux-gnu-g++")
    if os.environ.get("QEMU"):
        qemu = shutil.which(os.environ["QEMU"])
    else:
        qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    missing = [name for name, found in ((cxx, shutil.which(cxx)), ("qemu-aarch64 or qemu-aarch64-static", qemu))
               if not found]
    if missing:
        pytest.skip(f"AArch64 cross check needs {' and '.join(missing)} on PATH "
                    "(Debian: apt-get install g++-aarch64-linux-gnu qemu-user-static)")
    isas = _run("aarch64")
    assert isas == ["neon", "scalar"], isas
