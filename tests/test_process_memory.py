"""A chunk task's process gives freed multi-MB buffers back to the system (process_memory)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Frees a 4 MiB block once (glibc, left alone, then raises its mmap threshold to 4 MiB), then allocates, touches and
# frees another: prints how much of the second block the process still holds after freeing it.
PROBE = """
import json, sys
sys.path[:0] = [sys.argv[1] + "/plugins"]
import pyarrow as pa
from bq_backfill import process_memory

def rss_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])

applied = process_memory.release_freed_buffers() if sys.argv[2] == "release" else None
size = 4 << 20
first = bytearray(size)
first[::4096] = b"\\1" * (size // 4096)
del first
before = rss_kb()
second = bytearray(size)
second[::4096] = b"\\1" * (size // 4096)
del second
print(json.dumps({"applied": applied, "kept_kb": rss_kb() - before, "pool": pa.default_memory_pool().backend_name}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_a_freed_multi_megabyte_buffer_goes_back_to_the_system():
    released = probe("release")
    assert released["applied"] is True  # glibc here
    assert released["pool"] == "system"
    assert released["kept_kb"] < 1024, released
    # the same steps without it keep the block: what the setting is for
    assert probe("default")["kept_kb"] > 3 * 1024
