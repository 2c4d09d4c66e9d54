"""CuPy plumbing for the CUDA kernels: lazy import, one compile per process, torch interop.

* CuPy is imported only here and only when a CUDA tensor reaches a kernel, so ``import kernels``
  works without it; a missing CuPy raises a RuntimeError that says what to install.
* Each ``kernels/*.cu`` file becomes one ``cupy.RawModule`` per (file, device), built lazily and
  cached for the process (CuPy also caches the binary on disk, keyed by the source text, which has
  its headers inlined by :func:`kernels.sources.read_source`); its functions are looked up once.
  Template instantiations come from :data:`kernels.sources.KERNEL_SOURCES`.
* Everything device-specific -- compiling and loading the module, looking up a function, raising
  its dynamic shared memory limit, the launch -- runs inside ``cupy.cuda.Device(device)``, the
  tensors' device, never on whichever device happens to be current.
* Launch geometry is checked against CUDA's grid limits (:func:`check_grid`) and integer
  arguments against int32 before anything reaches the driver, so an oversized problem is a
  ValueError rather than a failed launch.
* Tensors are shared zero-copy through DLPack (``cupy.from_dlpack``); outputs are allocated by
  torch (its caching allocator), so no CuPy memory pool holds large blocks.
* Kernels launch on torch's current stream (``cupy.cuda.Stream.from_external`` when CuPy has it,
  else ``cupy.cuda.ExternalStream``), so they order correctly with surrounding torch work and no
  host synchronisation is added.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .sources import COMPILE_OPTIONS, KERNEL_SOURCES, read_source

__all__ = ["cupy", "get_kernel", "launch", "device_sm_count", "check_grid", "GRID_LIMITS", "INT32_MAX"]

INT32_MAX = 2**31 - 1
GRID_LIMITS = (INT32_MAX, 65535, 65535)  # gridDim.x, .y, .z on every architecture we target

_lock = threading.Lock()
_modules: dict[tuple[str, int], object] = {}
_functions: dict[tuple[str, str, int], object] = {}
_shared_set: dict[tuple[str, str, int], int] = {}
_streams: dict[tuple[int, int], object] = {}


def check_grid(grid) -> tuple[int, ...]:
    """``grid`` as a tuple of ints, or ValueError if a dimension is < 1 or above CUDA's limit."""
    grid = tuple(int(g) for g in grid)
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"a CUDA grid has 1 to 3 dimensions, got {grid}")
    for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS, strict=False)):
        if not 1 <= size <= limit:
            raise ValueError(f"grid dimension {'xyz'[axis]} = {size} is outside CUDA's range 1..{limit} (grid {grid})")
    return grid


def cupy():
    """The cupy module, or RuntimeError explaining how to get it."""
    try:
        import cupy as cp
    except ImportError as exc:
        raise RuntimeError(
            "CUDA tensors need CuPy for the packed kernels: pip install 'cupy-cuda13x>=13.6' "
            "(the project's [gpu] extra); CPU tensors work without it"
        ) from exc
    return cp


def get_kernel(source: str, name: str, device: int):
    """The compiled kernel ``name`` from ``kernels/<source>`` on ``device`` (compiled once)."""
    if name not in KERNEL_SOURCES.get(source, ()):
        raise ValueError(f"{name!r} is not declared for {source!r} in kernels.sources.KERNEL_SOURCES")
    key = (source, name, device)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    cp = cupy()
    with _lock, cp.cuda.Device(device):
        module = _modules.get((source, device))
        if module is None:
            module = cp.RawModule(
                code=read_source(source),
                options=COMPILE_OPTIONS,
                name_expressions=list(KERNEL_SOURCES[source]),
            )
            module.compile()
            _modules[(source, device)] = module
        fn = module.get_function(name)  # loads the module into this device's context
        _functions[key] = fn
    return fn


def _torch_stream(device: int):
    cp = cupy()
    ts = torch.cuda.current_stream(device)
    key = (device, ts.cuda_stream)
    stream = _streams.get(key)
    if stream is None:
        from_external = getattr(cp.cuda.Stream, "from_external", None)
        try:
            stream = from_external(ts) if from_external is not None else None
        except (TypeError, AttributeError):
            stream = None
        if stream is None:
            stream = cp.cuda.ExternalStream(ts.cuda_stream, device)
        _streams[key] = stream
    return stream


def device_sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _arg(value):
    """Kernel arguments: tensors zero-copy through DLPack, ints as np.int32, else as given."""
    if isinstance(value, torch.Tensor):
        if not value.is_contiguous():
            raise ValueError("internal error: kernels need contiguous tensors")
        if value.data_ptr() % value.element_size():
            raise ValueError(f"kernels need element-aligned tensors; data_ptr {value.data_ptr():#x} is not")
        if value.requires_grad:
            raise ValueError("internal error: DLPack refuses tensors that require grad; detach first")
        return cupy().from_dlpack(value)
    if isinstance(value, bool):
        raise ValueError("internal error: bool kernel argument")
    if isinstance(value, int):
        if not -INT32_MAX - 1 <= value <= INT32_MAX:
            raise ValueError(f"kernel argument {value} does not fit the kernels' int32 sizes")
        return np.int32(value)
    return value


def launch(source: str, name: str, device: int, grid, block, args, shared_mem: int = 0) -> None:
    """Launch ``name`` on torch's current stream of ``device`` with zero-copy tensor arguments."""
    grid = check_grid(grid)
    cp = cupy()
    with cp.cuda.Device(device):
        args = tuple(_arg(a) for a in args)
        kernel = get_kernel(source, name, device)
        key = (source, name, device)
        if shared_mem > 48 * 1024 and _shared_set.get(key, 0) < shared_mem:
            kernel.max_dynamic_shared_size_bytes = shared_mem
            _shared_set[key] = shared_mem
        with _torch_stream(device):
            kernel(grid, tuple(block), args, shared_mem=shared_mem)
