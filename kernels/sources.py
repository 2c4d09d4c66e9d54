"""The CUDA sources of this package and a driverless compiler for them (NVRTC, nvcc fallback).

``KERNEL_SOURCES`` maps each ``kernels/*.cu`` file to the kernel names it must export (template
instantiations are given as C++ name expressions).  The CuPy launcher (:mod:`kernels.cuda_matmul`)
and the compile test both read this table, so a kernel cannot be added to one and not the other.

:func:`compile_source` compiles one file for a given architecture **without a GPU or driver**,
through NVRTC from the ``nvidia-cuda-nvrtc`` wheel via ``cuda.bindings.nvrtc`` (both come with
torch's CUDA wheels), or through ``nvcc`` if the bindings are missing.  ptxas runs with ``-v`` so
the log reports registers and spill bytes per kernel; :func:`spill_report` parses it.  (CuPy's own
``RawModule.compile`` needs a driver, so it cannot serve CI.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SOURCE_DIR",
    "KERNEL_SOURCES",
    "CompileResult",
    "compile_source",
    "spill_report",
    "available_compiler",
    "read_source",
]

SOURCE_DIR = Path(__file__).resolve().parent
COMPILE_OPTIONS = ("--std=c++17",)

GEMV_MAX_ROWS = 16
GEMV_ROW_VARIANTS = (1, 2, 4, 8, 16)

KERNEL_SOURCES: dict[str, tuple[str, ...]] = {
    "binary_gemv.cu": tuple(
        f"packed_gemv<{planes}, {rows}, {vec}>"
        for planes in (1, 2)
        for rows in GEMV_ROW_VARIANTS
        for vec in (1, 2)
    ),
    "binary_gemm.cu": ("packed_gemm<1>", "packed_gemm<2>"),
    "binary_gemm_tc.cu": ("row_popcount", "packed_gemm_tc"),
    "epilogue.cu": ("epilogue_affine", "epilogue_sign_pack"),
}


def read_source(name: str) -> str:
    """Text of ``kernels/<name>``; raises ValueError for a file not in KERNEL_SOURCES."""
    if name not in KERNEL_SOURCES:
        raise ValueError(f"unknown kernel source {name!r}; known: {sorted(KERNEL_SOURCES)}")
    return (SOURCE_DIR / name).read_text()


@dataclass
class CompileResult:
    """Outcome of one compilation: ``ok``, the compiler log, and the compiler that ran."""

    ok: bool
    log: str
    compiler: str


def available_compiler() -> str | None:
    """'nvrtc' if cuda.bindings.nvrtc loads and works, else 'nvcc' if on PATH, else None."""
    try:
        from cuda.bindings import nvrtc

        err, *_ = nvrtc.nvrtcVersion()
        if err == nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return "nvrtc"
    except Exception:  # noqa: BLE001 - any import/loader failure means "not usable here"
        pass
    return "nvcc" if shutil.which("nvcc") else None


def _compile_nvrtc(name: str, arch: str) -> CompileResult:
    from cuda.bindings import nvrtc

    def check(result):
        err, *rest = result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC call failed: {err}")
        return rest[0] if rest else None

    prog = check(nvrtc.nvrtcCreateProgram(read_source(name).encode(), name.encode(), 0, [], []))
    try:
        for expr in KERNEL_SOURCES[name]:
            check(nvrtc.nvrtcAddNameExpression(prog, expr.encode()))
        opts = [
            *(o.encode() for o in COMPILE_OPTIONS),
            f"--gpu-architecture={arch}".encode(),
            f"--include-path={SOURCE_DIR}".encode(),
            b"--ptxas-options=-v",
        ]
        err, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        size = check(nvrtc.nvrtcGetProgramLogSize(prog))
        log = b" " * size
        check(nvrtc.nvrtcGetProgramLog(prog, log))
        text = log.decode(errors="replace").rstrip("\x00")
        return CompileResult(err == nvrtc.nvrtcResult.NVRTC_SUCCESS, text, "nvrtc")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _compile_nvcc(name: str, arch: str) -> CompileResult:
    # Taking the address of each template specialization instantiates it (nvcc has no name
    # expressions); extern "C" kernels need nothing.
    templated = [expr for expr in KERNEL_SOURCES[name] if "<" in expr]
    instantiations = (
        "static void* const kernels_instantiations[] = {"
        + ", ".join(f"(void*)&{expr}" for expr in templated)
        + "};\n"
        if templated
        else ""
    )
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / name
        src.write_text(read_source(name) + "\n" + instantiations)
        cmd = [
            shutil.which("nvcc") or "nvcc",
            "-std=c++17",
            f"-arch={arch}",
            "-cubin",
            "-Xptxas",
            "-v",
            f"-I{SOURCE_DIR}",
            "-o",
            str(Path(tmp) / "out.cubin"),
            str(src),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return CompileResult(proc.returncode == 0, proc.stdout + proc.stderr, "nvcc")


def compile_source(name: str, arch: str = "sm_90", compiler: str | None = None) -> CompileResult:
    """Compile ``kernels/<name>`` for ``arch`` with ptxas -v and return the log (no GPU needed)."""
    compiler = compiler or available_compiler()
    if compiler == "nvrtc":
        return _compile_nvrtc(name, arch)
    if compiler == "nvcc":
        return _compile_nvcc(name, arch)
    raise RuntimeError(
        "no CUDA compiler: install the nvidia-cuda-nvrtc and cuda-bindings wheels, or put nvcc on PATH"
    )


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def spill_report(log: str) -> dict[str, tuple[int, int, int]]:
    """Map each compiled entry (mangled name) to (stack frame, spill store, spill load) bytes."""
    report: dict[str, tuple[int, int, int]] = {}
    current = None
    stack = 0
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = m.group(1)
        elif current and (m := _STACK.search(line)) and (s := _SPILL.search(line)):
            stack = int(m.group(1))
            report[current] = (stack, int(s.group(1)), int(s.group(2)))
    return report
