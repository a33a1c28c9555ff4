"""What the machine offers: physical cores (decode speed is bound by memory bandwidth, which hyper-threads share)
and free memory."""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Physical CPU cores (distinct core ids per package in /proc/cpuinfo), else half the logical CPUs; >= 1."""
    try:
        cores: set[tuple[str, str]] = set()
        block: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            if ":" in line:
                key, value = line.split(":", 1)
                block[key.strip()] = value.strip()
            elif block:
                # Without core ids (some VMs, ARM) every processor counts as a core.
                cores.add((block.get("physical id", "0"), block.get("core id", block.get("processor", ""))))
                block = {}
        if cores:
            return len(cores)
    except OSError:
        pass
    return max(1, (os.cpu_count() or 2) // 2)


def available_memory() -> int | None:
    """Bytes of memory available to a new process now (Linux MemAvailable), or None where it cannot be told."""
    return _meminfo("MemAvailable")


def total_memory() -> int | None:
    """Bytes of physical memory."""
    return _meminfo("MemTotal")


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # macOS and other Unixes: physical memory is all that can be told
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
