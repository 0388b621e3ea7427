"""How many CPUs this process may use: what `serve --workers auto` starts one worker per.

The affinity mask (taskset, cpusets), lowered to the CPU quota of the process's cgroup
v2 and of every cgroup above it (`cpu.max`: `docker run --cpus 2`, systemd's
`CPUQuota=`), rounded up; at least 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(root: Path = CGROUP_ROOT, own: str | None = None) -> int:
    """The CPUs this process may run on. `own` is this process's cgroup path (the
    `0::PATH` line of /proc/self/cgroup; read when not given)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    for folder in _cgroups(root, _own_cgroup() if own is None else own):
        quota = _quota(folder / "cpu.max")
        if quota is not None:
            cpus = min(cpus, quota)
    return max(1, cpus)


def _own_cgroup() -> str:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return "/"


def _cgroups(root: Path, own: str) -> list[Path]:
    """`root` joined with `own` and each of its parents, `root` itself included."""
    parts = [p for p in own.split("/") if p and p not in (".", "..")]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _quota(cpu_max: Path) -> int | None:
    """A `cpu.max` file's quota in whole CPUs (rounded up); None without a quota."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None
