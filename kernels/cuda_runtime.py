"""CuPy plumbing for the CUDA kernels: lazy import, one compile per process, torch interop.

* CuPy is imported only here and only when a CUDA tensor reaches a kernel, so ``import kernels``
  works without it; a missing CuPy raises a RuntimeError that says what to install.
* Each ``kernels/*.cu`` file becomes one ``cupy.RawModule`` per (file, device), built lazily and
  cached for the process (CuPy also caches the binary on disk); its functions are looked up once.
  Template instantiations come from :data:`kernels.sources.KERNEL_SOURCES`.
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

from .sources import COMPILE_OPTIONS, KERNEL_SOURCES, SOURCE_DIR, read_source

__all__ = ["cupy", "get_kernel", "launch", "device_sm_count"]

_lock = threading.Lock()
_modules: dict[tuple[str, int], object] = {}
_functions: dict[tuple[str, str, int], object] = {}
_streams: dict[tuple[int, int], object] = {}


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
    with _lock:
        module = _modules.get((source, device))
        if module is None:
            with cp.cuda.Device(device):
                module = cp.RawModule(
                    code=read_source(source),
                    options=(*COMPILE_OPTIONS, f"-I{SOURCE_DIR}"),
                    name_expressions=list(KERNEL_SOURCES[source]),
                )
                module.compile()
            _modules[(source, device)] = module
        fn = module.get_function(name)
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
        return cupy().from_dlpack(value)
    if isinstance(value, bool):
        raise ValueError("internal error: bool kernel argument")
    if isinstance(value, int):
        return np.int32(value)
    return value


def launch(source: str, name: str, device: int, grid, block, args, shared_mem: int = 0) -> None:
    """Launch ``name`` on torch's current stream of ``device`` with zero-copy tensor arguments."""
    kernel = get_kernel(source, name, device)
    if shared_mem > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = shared_mem
    cp = cupy()
    with cp.cuda.Device(device), _torch_stream(device):
        kernel(tuple(grid), tuple(block), tuple(_arg(a) for a in args), shared_mem=shared_mem)
