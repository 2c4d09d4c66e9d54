"""Every CUDA source in kernels/ compiles for sm_90 without a GPU, and no kernel spills.

Uses NVRTC from the nvidia-cuda-nvrtc wheel through cuda.bindings.nvrtc (both come with torch's
CUDA wheels); falls back to nvcc; skips with the reason only if neither exists.  ptxas -v reports
per entry function its stack frame and spill bytes; all must be 0 so the register tiles really
live in registers.
"""

from __future__ import annotations

import re

import pytest

from kernels import sources

COMPILER = sources.available_compiler()
needs_compiler = pytest.mark.skipif(
    COMPILER is None, reason="neither cuda.bindings.nvrtc (nvidia-cuda-nvrtc wheel) nor nvcc is available"
)


def test_every_cu_file_is_declared():
    on_disk = {p.name for p in sources.SOURCE_DIR.glob("*.cu")}
    assert on_disk == set(sources.KERNEL_SOURCES), "kernels/*.cu and KERNEL_SOURCES must agree"


@needs_compiler
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("name", sorted(sources.KERNEL_SOURCES))
def test_compiles_without_spills(name, arch):
    result = sources.compile_source(name, arch=arch)
    assert result.ok, f"{name} failed to compile for {arch} with {result.compiler}:\n{result.log}"
    report = sources.spill_report(result.log)
    assert len(report) == len(sources.KERNEL_SOURCES[name]), (
        f"expected one ptxas report per declared kernel of {name}, got {sorted(report)}"
    )
    spilling = {fn: v for fn, v in report.items() if any(v)}
    assert not spilling, f"{name} ({arch}): stack/spill bytes (frame, stores, loads) {spilling}"


def test_spill_report_parses_a_spilling_log():
    log = (
        "ptxas info    : Compiling entry function '_Z3fooPi' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z3fooPi\n"
        "    24 bytes stack frame, 20 bytes spill stores, 16 bytes spill loads\n"
        "ptxas info    : Compiling entry function 'bar' for 'sm_90'\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
    )
    assert sources.spill_report(log) == {"_Z3fooPi": (24, 20, 16), "bar": (0, 0, 0)}


needs_nvrtc = pytest.mark.skipif(COMPILER != "nvrtc", reason="needs cuda.bindings.nvrtc for PTX output")


def _function_ptx(ptx: str, entry: str) -> str:
    start = ptx.index(f".entry {entry}(")
    end = ptx.find(".entry ", start + 1)
    return ptx[start : end if end > 0 else len(ptx)]


@needs_nvrtc
@pytest.mark.parametrize(
    "options", [sources.COMPILE_OPTIONS, sources.cupy_effective_options()], ids=["ours", "as_cupy_compiles"]
)
def test_float_epilogue_is_ieee_under_the_options_cupy_really_uses(options):
    """CuPy appends -ftz=true (NVRTC honours the last one): the epilogue must still keep subnormals."""
    ptx = sources.compile_ptx("epilogue.cu", options=options)
    body = _function_ptx(ptx, "epilogue_affine")
    float_ops = re.findall(r"\b(?:mul|add|fma|mad|sub|cvt)\.[\w.]*f32[\w.]*", body)
    assert any(op.startswith("mul.rn.f32") for op in float_ops), float_ops
    assert any(op.startswith("add.rn.f32") for op in float_ops), float_ops
    assert not [op for op in float_ops if ".ftz" in op], f"flush-to-zero float ops: {float_ops}"
    assert not [op for op in float_ops if op.startswith(("fma", "mad"))], f"contracted: {float_ops}"


@needs_nvrtc
def test_plain_intrinsics_would_flush_under_cupy_options():
    """The check above can fail: CuPy's -ftz=true does turn __fmul_rn into mul.rn.ftz.f32."""
    ptx = sources.compile_ptx("epilogue.cu", options=sources.cupy_effective_options())
    sign_pack = _function_ptx(ptx, "epilogue_sign_pack")
    assert "mul.rn.f64" in sign_pack and "add.rn.f64" in sign_pack  # float64: no ftz variant exists
    from cuda.bindings import nvrtc

    src = b'extern "C" __global__ void f(const float* a, float* y) { y[0] = __fmul_rn(a[0], a[1]); }'
    err, prog = nvrtc.nvrtcCreateProgram(src, b"probe.cu", 0, [], [])
    try:
        opts = [o.encode() for o in sources.cupy_effective_options()] + [b"--gpu-architecture=compute_90"]
        assert nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0] == nvrtc.nvrtcResult.NVRTC_SUCCESS
        ptx = sources.nvrtc_string(nvrtc.nvrtcGetPTXSize(prog)[1], lambda buf: nvrtc.nvrtcGetPTX(prog, buf),
                                   lambda result: result[0])
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    assert "mul.rn.ftz.f32" in ptx


@needs_nvrtc
def test_reading_an_empty_nvrtc_log_leaves_python_constants_alone():
    """An empty log has size 1; writing its NUL into `b" " * 1` (CPython's shared b" ") corrupted
    every b" " in the process, and with it torch.save's checkpoints."""
    sources.compile_ptx("epilogue.cu")  # compiles cleanly: empty log
    assert bytes([32]) == b"\x20" and b" ".decode() == " "
