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

Most of that cost is the 4 KiB pages: each fresh mapping faults in page by page (and each unmap
shoots down the other threads' TLB entries). glibc 2.35 and later can ask the kernel for
transparent huge pages (2 MiB) for its mappings, a start-up setting only:
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py ...`` (the kernel's THP mode ``madvise`` or
``always``). Measured on ResNet-18 XNOR, batch 128, int2 with freed memory returned: 1.15-1.39x
the step time of ``none`` at glibc's defaults (median 1.26x; with 4 KiB pages 1.76-1.81x), with
the peak 1.98-2.11x lower (benchmarks/RESULTS.md).
``malloc_huge_pages`` says whether the running process was started so; the trainer warns when
memory is returned without it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

#: glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD = -3)
M_MMAP_THRESHOLD = -3
#: glibc's default starting threshold: blocks of 128 KiB and more are mmapped
DEFAULT_THRESHOLD = 128 * 1024
#: the start-up setting that gives malloc's mappings transparent huge pages (glibc >= 2.35)
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def malloc_huge_pages(environ=None, thp_mode: Path = THP_MODE) -> bool:
    """Whether this process's malloc was started asking for huge pages: ``GLIBC_TUNABLES`` (read by
    glibc at start-up only, so as the environment has it) sets ``glibc.malloc.hugetlb`` to 1 with the
    kernel's THP mode not ``never``, or to 2 (hugetlbfs pages, reserved by the administrator)."""
    environ = os.environ if environ is None else environ
    settings = dict(part.split("=", 1) for part in environ.get("GLIBC_TUNABLES", "").split(":") if "=" in part)
    value = settings.get("glibc.malloc.hugetlb")
    if value == "2":
        return True
    if value != "1":
        return False
    try:
        return "[never]" not in thp_mode.read_text()
    except OSError:
        return False


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
