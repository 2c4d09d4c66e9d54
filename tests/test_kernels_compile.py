"""Every CUDA source in kernels/ compiles for sm_90 without a GPU, and no kernel spills.

Uses NVRTC from the nvidia-cuda-nvrtc wheel through cuda.bindings.nvrtc (both come with torch's
CUDA wheels); falls back to nvcc; skips with the reason only if neither exists.  ptxas -v reports
per entry function its stack frame and spill bytes; all must be 0 so the register tiles really
live in registers.
"""

from __future__ import annotations

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
