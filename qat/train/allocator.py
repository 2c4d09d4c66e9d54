"""Give freed activation memory back to the operating system (glibc, Linux CPU training).

PyTorch's CPU tensors come from ``malloc``. glibc serves a large request with its own ``mmap``
(returned to the system by ``free``) only above the *mmap threshold*, and by default it raises
that threshold to the size of every mmapped block freed, up to 32 MiB. After the first training
step most activation-sized buffers are therefore carved from the heap, where freed blocks stay
resident and fragmented: the process's peak RSS ends far above what PyTorch holds live. Measured
on ResNet-18 XNOR, batch 128, one step's rise of RSS (``python -m qat.train.memory``, RESULTS.md):
1,521 -> 1,256 MiB for ``act_compression=none`` and 782 -> 317 MiB for ``int2`` once the threshold
is fixed, i.e. most of what compression saves stayed invisible in RSS without it.

``mallopt(M_MMAP_THRESHOLD, n)`` fixes the threshold (and so turns the dynamic raising off): blocks
of n bytes or more are mmapped and unmapped on free. The cost is a fresh, zeroed mapping for each
large allocation (page faults), paid by every step: on the 2-core AMD EPYC, ResNet-20 XNOR at batch
128 took 2.2-2.5 s per step instead of 1.0-1.1 s with ``none`` (loaded machine). So the trainer sets
it only on request (``trainer.return_freed_memory=true``), and ``python -m qat.train.memory`` with
the same override reports step time and peak memory under it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD = -3)
M_MMAP_THRESHOLD = -3
#: glibc's default starting threshold: blocks of 128 KiB and more are mmapped
DEFAULT_THRESHOLD = 128 * 1024


def return_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; True when it took effect (Linux with
    glibc), False elsewhere (macOS, Windows, musl), where nothing is changed."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))
