from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_accepts_the_setting():
    code = "from emmae.memory import retain_freed_memory; raise SystemExit(0 if retain_freed_memory(1 << 28) else 3)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
