"""The training process's allocator settings (training.keep_freed_memory)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from chatrlhf import training

# Allocates and frees a 48 MB buffer five times, then ten more, past glibc's largest mmap threshold
# by default (32 MiB), and prints whether the settings applied and the page faults of the ten.
CHILD = """
import resource, sys, torch
from chatrlhf import training
applied = training.keep_freed_memory() if sys.argv[1] == "keep" else None
x = torch.ones(12_000_000)
for _ in range(5):  # the heap's first growths may fault too
    y = x + x
    del y
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    y = x + x
    del y
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

# Where the user sets any of these, keep_freed_memory leaves malloc as the user set it.
USER_SETTINGS = [*training.MALLOPT, "GLIBC_TUNABLES"]
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory sets glibc's malloc")


def page_faults(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    done = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True, check=True)
    applied, faults = done.stdout.split()
    return applied, int(faults)


@glibc
def test_freed_buffers_are_reused_without_page_faults():
    # By default each 48 MB buffer is mapped afresh: 11,700 faults of 4 KiB pages each time here
    # (fewer where transparent huge pages back it), none once freed memory is kept.
    applied, default_faults = page_faults("default")
    huge_pages = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    assert default_faults > 1_000 or (huge_pages.exists() and "[always]" in huge_pages.read_text())
    applied, faults = page_faults("keep")
    assert applied == "True"
    assert faults < default_faults / 10


@pytest.mark.parametrize("name, value", [("MALLOC_TRIM_THRESHOLD_", "0"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")])
def test_the_users_own_malloc_settings_win(monkeypatch, name, value):
    for other in USER_SETTINGS:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, value)
    assert training.keep_freed_memory() is False
