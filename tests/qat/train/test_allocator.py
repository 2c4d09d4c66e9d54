"""qat.train.allocator: a fixed mmap threshold returns freed activation-sized blocks to the system."""
import subprocess
import sys

import pytest

from qat.train.allocator import malloc_huge_pages

SCRIPT = """
import sys, torch
from qat.train.allocator import return_freed_memory
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
if sys.argv[1] == "fixed":
    assert return_freed_memory()
big = torch.ones(4 * 2**20)
del big  # freeing a 16 MiB mmapped block raises glibc's dynamic threshold above 1 MiB
blocks = [torch.ones(2**18) for _ in range(64)]  # 64 blocks of 1 MiB
before = rss()
del blocks[::2]  # every other one: the heap cannot shrink from its top
print((before - rss()) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_fixed_threshold_returns_freed_blocks():
    returned = {}
    for variant in ("default", "fixed"):
        done = subprocess.run([sys.executable, "-c", SCRIPT, variant], capture_output=True, text=True, check=True)
        returned[variant] = float(done.stdout.strip().splitlines()[-1])
    assert returned["default"] < 4  # the freed 32 MiB stay resident
    assert returned["fixed"] > 28   # ... or go back to the system


@pytest.mark.parametrize("tunables, thp, expected", [
    ("glibc.malloc.hugetlb=1", "always [madvise] never", True),
    ("glibc.malloc.arena_max=1:glibc.malloc.hugetlb=1", "[always] madvise never", True),
    ("glibc.malloc.hugetlb=1", "always madvise [never]", False),  # the kernel grants none
    ("glibc.malloc.hugetlb=0", "always [madvise] never", False),
    ("glibc.malloc.hugetlb=2", "always madvise [never]", True),  # hugetlbfs, not THP
    ("", "always [madvise] never", False),
])
def test_malloc_huge_pages_reads_the_start_up_tunable_and_the_thp_mode(tmp_path, tunables, thp, expected):
    mode = tmp_path / "enabled"
    mode.write_text(thp + "\n")
    assert malloc_huge_pages({"GLIBC_TUNABLES": tunables}, mode) is expected
    assert malloc_huge_pages({}, mode) is False
