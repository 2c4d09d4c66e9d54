"""The native CPU engine: C++ popcount kernels compiled on first use, cached, called through ctypes.

Why this way: the kernels are plain C++ (``kernels/native_src/*.cpp``, no torch headers), so a
compile takes seconds, needs only a C++ compiler (``$CXX``, else ``c++`` / ``g++`` / ``clang++``),
and does not tie the library to the installed torch's C++ ABI; ``pip install -e .`` stays a pure
Python install (no build isolation pulling a second multi-GB torch).  The shared library is built
once per source version, compiler and machine into ``$BITQAT_CACHE_DIR`` (default
``~/.cache/bitqat``), written to a temporary name and renamed into place, so concurrent processes
and interrupted builds never see half a library.

Instruction sets: ``isa_kernels.cpp`` is compiled once per instruction set this compiler can
target (x86-64: ``scalar``, ``popcnt``, ``avx2``, ``avx512``; AArch64: ``scalar``, ``neon``) and
the best one the CPU supports is chosen at load time.  ``BITQAT_CPU_ISA=<name>`` forces one (an
error if this CPU lacks it); :func:`using_isa` does the same in code (tests run every path the
machine can).  ``BITQAT_NATIVE=0`` turns the engine off.  ``dispatch.cpp`` and ``saved_tensors.cpp``
(the memory-bound passes of training's compressed activations, ``qat.act_compression``) are compiled
once, without instruction-set flags.

Without a compiler (or when the build fails) :func:`available` is False, one warning says why,
and ``kernels`` runs its NumPy path, which is also the reference the tests compare against.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = [
    "available",
    "unavailable_reason",
    "isa",
    "isas",
    "using_isa",
    "pool",
    "pools",
    "using_pool",
    "library",
    "ConvArgs",
    "MaxPoolArgs",
    "I8Layer",
    "OUT_INT32",
    "OUT_FLOAT",
    "OUT_SIGN",
]

SOURCE_DIR = Path(__file__).resolve().parent / "native_src"
SOURCES = ("bitkernels.h", "isa_kernels.cpp", "dispatch.cpp", "saved_tensors.cpp")
#: compiled once, without instruction-set flags (the run-time dispatch, and passes that are memory-bound)
BASELINE_SOURCES = ("dispatch.cpp", "saved_tensors.cpp")
COMMON_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-fno-math-errno"]
#: the worker threads: OpenMP's team, the one torch uses (native_src/dispatch.cpp says why), when the
#: compiler has it; otherwise the library's own pool
OPENMP_FLAGS = ["-fopenmp"]
OUT_INT32, OUT_FLOAT, OUT_SIGN = 0, 1, 2

_ISA_FLAGS = {
    "x86": {
        "scalar": [],
        "popcnt": ["-mpopcnt"],
        "avx2": ["-mavx2", "-mpopcnt"],
        "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vpopcntdq", "-mavx2", "-mpopcnt"],
    },
    "arm64": {"scalar": [], "neon": []},
    "other": {"scalar": []},
}


def _arch() -> str:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "x86"
    if machine in ("aarch64", "arm64"):
        return "arm64"
    return "other"


class FloatConvSignArgs(ctypes.Structure):
    """Mirror of ``BqFloatConvSignArgs`` in ``native_src/bitkernels.h``."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        *[(name, ctypes.c_int64) for name in ("n", "c", "h", "w", "stride_n", "stride_c", "stride_h", "stride_w")],
        ("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p),
        *[(name, ctypes.c_int64) for name in ("o", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "ho", "wo")],
        ("mul", ctypes.c_void_p), ("add", ctypes.c_void_p), ("out", ctypes.c_void_p),
    ]


class ConvArgs(ctypes.Structure):
    """Mirror of ``BqConvArgs`` in ``native_src/bitkernels.h``."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("n", ctypes.c_int64), ("h", ctypes.c_int64), ("w", ctypes.c_int64),
        ("pixel_words", ctypes.c_int64), ("group_words", ctypes.c_int64), ("cin_per_group", ctypes.c_int64),
        ("panels", ctypes.c_void_p), ("tap_sums", ctypes.c_void_p),
        ("groups", ctypes.c_int64), ("out_per_group", ctypes.c_int64),
        ("kh", ctypes.c_int64), ("kw", ctypes.c_int64), ("sh", ctypes.c_int64), ("sw", ctypes.c_int64),
        ("ph", ctypes.c_int64), ("pw", ctypes.c_int64), ("dh", ctypes.c_int64), ("dw", ctypes.c_int64),
        ("ho", ctypes.c_int64), ("wo", ctypes.c_int64),
        ("mode", ctypes.c_int32),
        ("out", ctypes.c_void_p), ("out_stride", ctypes.c_int64),
        ("mul_f", ctypes.c_void_p), ("add_f", ctypes.c_void_p),
        ("mul_d", ctypes.c_void_p), ("add_d", ctypes.c_void_p),
        ("residual", ctypes.c_void_p), ("residual_stride", ctypes.c_int64),
        ("clamp", ctypes.c_int32), ("clamp_lo", ctypes.c_float), ("clamp_hi", ctypes.c_float),
    ]


class MaxPoolArgs(ctypes.Structure):
    """Mirror of ``BqMaxPoolArgs`` in ``native_src/bitkernels.h``."""

    _fields_ = [*[(name, ctypes.c_int64) for name in ("n", "h", "w", "words", "kh", "kw", "sh", "sw", "ph", "pw",
                                                     "dh", "dw", "ho", "wo")],
                ("and_mask", ctypes.c_void_p)]


class I8Layer(ctypes.Structure):
    """Mirror of ``BqI8Layer`` in ``native_src/bitkernels.h``."""

    _fields_ = [("codes", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("kp", ctypes.c_int64),
                ("weight_scale", ctypes.c_float), ("rms_eps", ctypes.c_float), ("bias", ctypes.c_void_p)]


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _cache_root() -> Path:
    if os.environ.get("BITQAT_CACHE_DIR"):
        return Path(os.environ["BITQAT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bitqat"


def _build_key(compiler: str) -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((SOURCE_DIR / name).read_bytes())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest.update(version.encode())
    digest.update(repr((platform.machine(), COMMON_FLAGS, OPENMP_FLAGS, _ISA_FLAGS[_arch()])).encode())
    return digest.hexdigest()[:16]


def _link(compiler: str, tmp: str, defines: list[str], openmp: list[str], isa_objects: list[Path],
          out: Path) -> None:
    """Compile the baseline sources (with ``openmp`` flags, maybe none) and link them with the ISA objects."""
    baseline = [Path(tmp) / f"{Path(source).stem}.o" for source in BASELINE_SOURCES]
    for source, obj in zip(BASELINE_SOURCES, baseline, strict=True):
        subprocess.run([compiler, *COMMON_FLAGS, *openmp, *defines, "-c", str(SOURCE_DIR / source), "-o", str(obj)],
                       check=True, capture_output=True, text=True, timeout=600)
    subprocess.run([compiler, "-shared", *openmp, "-o", str(out), *(str(o) for o in baseline),
                    *(str(o) for o in isa_objects), "-lpthread"], check=True, capture_output=True, text=True,
                   timeout=600)


def _build(compiler: str, target: Path) -> None:
    """Compile every instruction set the compiler accepts, then dispatch.cpp, into ``target``."""
    with tempfile.TemporaryDirectory(prefix="bitqat-build-") as tmp:
        jobs = {}
        for name, flags in _ISA_FLAGS[_arch()].items():
            obj = Path(tmp) / f"isa_{name}.o"
            cmd = [compiler, *COMMON_FLAGS, *flags, f"-DBQ_ISA_{name.upper()}", f"-DBQ_ISA_NAME={name}",
                   "-c", str(SOURCE_DIR / "isa_kernels.cpp"), "-o", str(obj)]
            jobs[name] = (obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        built, errors = [], {}
        for name, (obj, proc) in jobs.items():
            output, _ = proc.communicate(timeout=600)
            if proc.returncode == 0:
                built.append((name, obj))
            else:
                errors[name] = output.strip().splitlines()[-1:] or ["failed"]
        if "scalar" not in dict(built):
            raise RuntimeError(f"compiling the portable kernels failed: {errors.get('scalar')}")
        defines = [f"-DBQ_HAVE_{name.upper()}" for name, _ in built]
        partial = Path(tmp) / "libbitqat.so"
        for openmp in (OPENMP_FLAGS, []):  # without OpenMP when the compiler has none: the library's own pool
            try:
                _link(compiler, tmp, defines, openmp, [obj for _, obj in built], partial)
                break
            except subprocess.CalledProcessError:
                if not openmp:
                    raise
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(partial, staged)
        os.replace(staged, target)  # atomic: a reader sees no library or the whole one


_lock = threading.RLock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_threads = 0


def _declare(lib: ctypes.CDLL) -> None:
    c_i64, c_ptr = ctypes.c_int64, ctypes.c_void_p
    signatures = {
        "bq_set_num_threads": (None, [ctypes.c_int]),
        "bq_use_openmp": (ctypes.c_int, [ctypes.c_int]),
        "bq_openmp_built": (ctypes.c_int, []),
        "bq_isa_count": (ctypes.c_int, []),
        "bq_isa_name": (ctypes.c_char_p, [ctypes.c_int]),
        "bq_isa_supported": (ctypes.c_int, [ctypes.c_int]),
        "bq_select_isa": (ctypes.c_int, [ctypes.c_char_p]),
        "bq_selected_isa": (ctypes.c_char_p, []),
        "bq_conv": (None, [ctypes.POINTER(ConvArgs)]),
        "bq_float_conv_sign": (c_i64, [ctypes.POINTER(FloatConvSignArgs)]),
        "bq_conv_pooled": (c_i64, [ctypes.POINTER(ConvArgs), ctypes.POINTER(MaxPoolArgs), c_i64]),
        "bq_float_conv_sign_pooled": (c_i64, [ctypes.POINTER(FloatConvSignArgs), ctypes.POINTER(MaxPoolArgs), c_i64]),
        "bq_ternary_gemm": (None, [c_ptr, c_ptr, c_i64, c_ptr, c_ptr, c_i64, c_i64, c_ptr]),
        "bq_pack_rows": (c_i64, [c_ptr, c_i64, c_i64, c_i64, c_ptr, c_i64]),
        "bq_pack_planes": (c_i64, [c_ptr, c_i64, c_i64, c_i64, c_i64, c_ptr]),
        "bq_prepack_panels": (None, [c_ptr, c_i64, c_i64, c_ptr]),
        "bq_peak_bitmacs_per_s": (ctypes.c_double, [c_i64]),
        "bq_maxpool_bits": (None, [c_ptr, ctypes.POINTER(MaxPoolArgs), c_ptr]),
        "bq_affine_sign_pack": (c_i64, [c_ptr, *[c_i64] * 8, c_ptr, c_ptr, c_ptr]),
        "bq_ternary_i8_prepack": (None, [c_ptr, c_ptr, c_i64, c_i64, c_i64, c_ptr]),
        "bq_ternary_i8_gemm": (None, [c_ptr, c_i64, c_i64, c_i64, c_ptr, c_i64, c_i64, c_ptr]),
        "bq_ternary_i8_lut_prepack": (None, [c_ptr, c_ptr, c_i64, c_i64, c_i64, c_ptr]),
        "bq_ternary_i8_lut_gemm": (None, [c_ptr, c_i64, c_i64, c_i64, c_ptr, c_i64, c_ptr]),
        "bq_quantize_i8": (c_i64, [c_ptr, c_i64, c_i64, c_i64, ctypes.c_float, c_ptr, c_i64, c_ptr]),
        "bq_ternary_i8_layer": (c_i64, [ctypes.POINTER(I8Layer), c_ptr, c_i64, c_ptr]),
        "bq_ternary_i8_linear": (c_i64, [c_ptr, c_i64, c_i64, c_i64, ctypes.c_float, c_ptr, c_i64, c_i64,
                                         ctypes.c_float, c_ptr, c_ptr]),
        "bq_pack_compare": (c_i64, [c_ptr, c_i64, c_i64, ctypes.c_float, c_i64, c_ptr]),
        "bq_scaled_to_i16": (None, [c_ptr, c_i64, c_i64, c_i64, c_ptr, c_ptr]),
        "bq_i16_to_scaled": (None, [c_ptr, c_i64, c_i64, c_i64, c_ptr, c_ptr]),
        "bq_zero_where": (None, [c_ptr, c_i64, c_ptr]),
        "bq_quantize_groups": (None, [c_ptr, c_i64, c_i64, ctypes.c_uint64, c_i64, c_ptr, c_ptr, c_ptr]),
        "bq_dequantize_groups": (None, [c_ptr, c_i64, c_i64, c_i64, c_ptr, c_ptr, c_ptr]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


def _load() -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    target = _cache_root() / f"native-{_build_key(compiler)}" / "libbitqat.so"
    if not target.is_file():
        _build(compiler, target)
    lib = ctypes.CDLL(str(target))
    _declare(lib)
    forced = os.environ.get("BITQAT_CPU_ISA", "").strip() or None
    _select(lib, None if forced in (None, "auto") else forced, "BITQAT_CPU_ISA")
    _select_pool(lib, os.environ.get("BITQAT_CPU_POOL", "").strip() or "auto", "BITQAT_CPU_POOL")
    return lib


POOLS = ("openmp", "own")


def _select_pool(lib, name: str, source: str) -> None:
    if name not in (*POOLS, "auto"):
        raise ValueError(f"{source}={name!r} is not a thread pool of the native kernels; valid: openmp, own, auto")
    if name == "openmp" and not lib.bq_openmp_built():
        raise ValueError(f"{source}=openmp: the native kernels were built without OpenMP here (valid: own, auto)")
    lib.bq_use_openmp(0 if name == "own" else 1)  # auto: OpenMP where built (the library ignores it otherwise)


def pools() -> list[str]:
    """The thread pools built here: ``own`` always, ``openmp`` first when the library has OpenMP."""
    return list(POOLS) if library().bq_openmp_built() else [POOLS[1]]


def pool() -> str:
    """Whose threads run the kernels: ``openmp`` (the team torch uses) or ``own`` (the library's pool)."""
    return POOLS[0] if library().bq_use_openmp(-1) else POOLS[1]


def using_pool(name: str):
    """Run the block with the kernels' threads from ``name`` (``openmp`` or ``own``)."""
    return _switched(pool, _select_pool, name, "pool")


@contextlib.contextmanager
def _switched(current, select, name: str, source: str):
    """A block run with ``select(lib, name, source)`` in force, the ``current()`` setting restored after."""
    lib = library()
    with _lock:
        previous = current()
        select(lib, name, source)
        try:
            yield
        finally:
            select(lib, previous, source)


def _isa_table(lib) -> list[tuple[str, bool]]:
    return [(lib.bq_isa_name(i).decode(), bool(lib.bq_isa_supported(i))) for i in range(lib.bq_isa_count())]


def _select(lib, name: str | None, source: str) -> None:
    status = lib.bq_select_isa(None if name is None else name.encode())
    if status == 0:
        return
    table = _isa_table(lib)
    runnable = [n for n, ok in table if ok]
    if status == -1:
        raise ValueError(f"{source}={name!r} is not an instruction set the native kernels were built for here; "
                         f"valid: {', '.join(n for n, _ in table)} (this CPU runs {', '.join(runnable)}) or auto")
    raise ValueError(f"{source}={name!r}: this CPU does not support it; it runs {', '.join(runnable)}")


def library() -> ctypes.CDLL:
    """The loaded native library (built on first call); RuntimeError if it is unavailable."""
    global _lib, _reason
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None and _reason is None:
            if os.environ.get("BITQAT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
                _reason = "disabled by BITQAT_NATIVE=0"
            else:
                try:
                    _lib = _load()
                except ValueError:
                    raise  # a bad BITQAT_CPU_ISA is the user's error, not a missing engine
                except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                    detail = getattr(error, "stderr", None) or str(error)
                    _reason = f"{type(error).__name__}: {str(detail).strip().splitlines()[-1] if detail else ''}"
                    warnings.warn(f"bitqat: native CPU kernels unavailable ({_reason}); using the slower NumPy "
                                  "path", RuntimeWarning, stacklevel=3)
        if _lib is None:
            raise RuntimeError(f"native CPU kernels unavailable: {_reason}")
        return _lib


def available() -> bool:
    """True when the native kernels are built and loaded (builds them on the first call)."""
    try:
        library()
    except RuntimeError:
        return False
    return True


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None while it is True)."""
    return None if available() else _reason


def isa() -> str:
    """The instruction set the kernels run with now (``avx2``, ``neon``, ...)."""
    return library().bq_selected_isa().decode()


def isas() -> list[tuple[str, bool]]:
    """Every instruction set built here, best first, with whether this CPU runs it."""
    return _isa_table(library())


def using_isa(name: str):
    """Run the block with the kernels of instruction set ``name`` (ValueError if this CPU lacks it)."""
    return _switched(isa, _select, name, "isa")


def sync_threads() -> None:
    """Use as many threads as torch does (``torch.set_num_threads``)."""
    global _threads
    wanted = torch.get_num_threads()
    if wanted != _threads:
        library().bq_set_num_threads(wanted)
        _threads = wanted
