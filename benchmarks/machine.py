"""What every benchmark prints about the machine it ran on (shared by the scripts in this folder)."""

from __future__ import annotations

import platform


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return fh.read()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cpu_flags(*names: str) -> list[str]:
    """Which of `names` (e.g. avx512_bf16, amx_bf16) the CPU reports."""
    flags = set()
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return [n for n in names if n in flags]
