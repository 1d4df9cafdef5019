"""The native kernels (`server/_fastsample.c`): the build this CPU runs fastest.

setup.py builds the kernels for the x86-64 baseline (`server._fastsample`, or the only build
on other machines) and, on x86-64, for levels v3 (AVX2) and v4 (AVX-512), each with vectors
as wide as its level's registers. A build for a level the CPU lacks would die on its first
instruction, so the baseline build is asked the CPU's level (`cpu_level`) before another is
imported. `BUILDS` are the builds this CPU runs, the fastest first; `kernels` is the first, or
None where none was built (no C compiler at install: the callers then use numpy and the sampler
graph). Each build says the level it was compiled for (`LEVEL`: 4, 3, or 1 for the baseline).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# The builds above the baseline, best first, with the level each needs.
LEVELS = (("_fastsample_v4", 4), ("_fastsample_v3", 3))


def _builds() -> list[ModuleType]:
    """Every build this CPU runs, the fastest first (empty where none was built)."""
    try:
        baseline = importlib.import_module("server._fastsample")
    except ImportError:
        return []
    level = baseline.cpu_level()
    found = []
    for name, needs in LEVELS:
        if level >= needs:
            try:
                found.append(importlib.import_module(f"server.{name}"))
            except ImportError:  # not built: a compiler without the level's flag
                continue
    return [*found, baseline]


def level_name(build: ModuleType) -> str:
    """Which build `build` is, for the server's log: "x86-64-v4", "x86-64-v3" or "baseline"."""
    return f"x86-64-v{build.LEVEL}" if build.LEVEL >= 3 else "baseline"


BUILDS: list[ModuleType] = _builds()
kernels: ModuleType | None = BUILDS[0] if BUILDS else None
