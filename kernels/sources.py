"""The CUDA sources of this package and a driverless compiler for them (NVRTC, nvcc fallback).

``KERNEL_SOURCES`` maps each ``kernels/*.cu`` file to the kernel names it must export (template
instantiations are given as C++ name expressions).  The CuPy launcher (:mod:`kernels.cuda_matmul`)
and the compile test both read this table, so a kernel cannot be added to one and not the other.

:func:`read_source` returns a file with its local ``#include "x.cuh"`` headers **inlined** (each
header once, ``#line`` directives keep compiler messages pointing at the real files).  The text a
compiler sees is therefore self-contained, and CuPy's on-disk kernel cache, whose key hashes the
source text and the options but not included files, gets a new key whenever a header changes.

:data:`COMPILE_OPTIONS` asks for IEEE float semantics (no flush-to-zero, IEEE division and square
root, no FMA contraction) so that the float epilogue agrees with the CPU path bit for bit.  CuPy
appends ``-ftz=true`` after the caller's options and NVRTC honours the last occurrence, so the
flag alone cannot be relied on: the float epilogue also uses explicit non-``.ftz`` PTX
instructions (``epilogue.cu``), which no option changes.  :func:`compile_ptx` lets the tests
check the emitted instructions under CuPy's effective options (:func:`cupy_effective_options`).

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
    "COMPILE_OPTIONS",
    "compile_ptx",
    "cupy_effective_options",
]

SOURCE_DIR = Path(__file__).resolve().parent
# IEEE float semantics, as on the CPU: keep subnormals, IEEE-rounded '/' and sqrt, no FMA contraction.
COMPILE_OPTIONS = ("--std=c++17", "-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-fmad=false")
# What CuPy's compiler (cupy.cuda.compiler._compile_with_cache_cuda) appends to the caller's options.
CUPY_APPENDED_OPTIONS = ("-ftz=true",)

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


_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.M)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.M)


def _inline_includes(name: str, seen: set[str]) -> str:
    """``kernels/<name>`` with each local ``#include "h"`` replaced by h's text (once per header)."""
    text = (SOURCE_DIR / name).read_text()
    out, pos = [], 0
    for match in _LOCAL_INCLUDE.finditer(text):
        header = match.group(1)
        if not (SOURCE_DIR / header).is_file():
            raise ValueError(f"{name} includes {header!r}, which is not in {SOURCE_DIR}")
        out.append(text[pos : match.start()])
        if header not in seen:
            seen.add(header)
            line_after = text.count("\n", 0, match.end()) + 2
            body = _PRAGMA_ONCE.sub("", _inline_includes(header, seen))
            out.append(f'#line 1 "{header}"\n{body.rstrip()}\n#line {line_after} "{name}"')
        pos = match.end()
    out.append(text[pos:])
    return "".join(out)


def read_source(name: str) -> str:
    """Self-contained text of ``kernels/<name>``: local headers inlined (see the module docstring).

    Raises ValueError for a file not in KERNEL_SOURCES.
    """
    if name not in KERNEL_SOURCES:
        raise ValueError(f"unknown kernel source {name!r}; known: {sorted(KERNEL_SOURCES)}")
    return _inline_includes(name, set())


def cupy_effective_options(options=COMPILE_OPTIONS) -> tuple[str, ...]:
    """The option list NVRTC receives from ``cupy.RawModule(options=options)`` (CuPy appends its own)."""
    return (*options, *CUPY_APPENDED_OPTIONS)


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


def nvrtc_string(size: int, read, check) -> str:
    """Text NVRTC writes into a caller's buffer of `size` bytes (log or PTX, NUL-terminated).

    The buffer must be a fresh mutable `bytearray`: `b" " * size` is CPython's shared one-byte
    object when size == 1 (an empty log), and NVRTC writing its NUL into it corrupts every b" " in
    the process (torch.save then wrote checkpoints torch.load refused)."""
    buffer = bytearray(size)
    check(read(buffer))
    return bytes(buffer).decode(errors="replace").rstrip("\x00")


def _nvrtc_program(name: str, arch: str, options, want_ptx: bool = False) -> tuple[CompileResult, str]:
    """Compile ``kernels/<name>`` with NVRTC; returns (result, PTX text or '' unless want_ptx)."""
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
        opts = [*(o.encode() for o in options), f"--gpu-architecture={arch}".encode()]
        err, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        text = nvrtc_string(check(nvrtc.nvrtcGetProgramLogSize(prog)),
                            lambda buf: nvrtc.nvrtcGetProgramLog(prog, buf), check)
        ok = err == nvrtc.nvrtcResult.NVRTC_SUCCESS
        ptx = ""
        if ok and want_ptx:
            ptx = nvrtc_string(check(nvrtc.nvrtcGetPTXSize(prog)), lambda buf: nvrtc.nvrtcGetPTX(prog, buf), check)
        return CompileResult(ok, text, "nvrtc"), ptx
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _compile_nvrtc(name: str, arch: str) -> CompileResult:
    return _nvrtc_program(name, arch, (*COMPILE_OPTIONS, "--ptxas-options=-v"))[0]


def compile_ptx(name: str, arch: str = "compute_90", options=COMPILE_OPTIONS) -> str:
    """PTX of ``kernels/<name>`` from NVRTC with exactly ``options`` (no GPU needed).

    Raises RuntimeError with the log if compilation fails or NVRTC is unavailable.
    """
    if available_compiler() != "nvrtc":
        raise RuntimeError("compile_ptx needs cuda.bindings.nvrtc (nvidia-cuda-nvrtc and cuda-bindings wheels)")
    result, ptx = _nvrtc_program(name, arch, options, want_ptx=True)
    if not result.ok:
        raise RuntimeError(f"{name} failed to compile with {options}:\n{result.log}")
    return ptx


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
            *(o for o in COMPILE_OPTIONS if not o.startswith("--std")),
            f"-arch={arch}",
            "-cubin",
            "-Xptxas",
            "-v",
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
