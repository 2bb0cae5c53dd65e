"""How many CPU threads llama.cpp gets when the user does not say (--threads).

llama.cpp's threads wait for each other at every step of a batch, spinning: a thread on a core that another
process keeps busy holds all of them back. On 2 cores beside one busy process, compressing with 2 threads
ran at 9 tokens/s and with 1 at ~220. So the default is the usable CPUs that are idle when the
process starts (measured once, over a fifth of a second): a busy machine is slower, not 25 times slower.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

SAMPLE_SECONDS = 0.2
BUSY_SHARE = 0.5  # a CPU busy more than half the sample is left to whoever keeps it busy


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which containers and taskset narrow)."""
    return len(_usable())


def _usable() -> set[int]:
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def _cpu_times() -> dict[int, tuple[int, int]]:
    """CPU number -> (busy, total) time in clock ticks since boot, from /proc/stat ({} where there is none)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return {}
    times = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(v) for v in fields[:8]]
            idle = values[3] + values[4]  # idle and iowait
            times[int(name[3:])] = (sum(values) - idle, sum(values))
    return times


def idle_cpus(seconds: float = SAMPLE_SECONDS) -> int:
    """How many of the usable CPUs were busy at most BUSY_SHARE of the next `seconds` (at least 1; all of
    them where the system does not tell)."""
    cpus = _usable()
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    if not cpus <= before.keys() or not cpus <= after.keys():
        return len(cpus)
    idle = 0
    for cpu in cpus:
        busy, total = (after[cpu][i] - before[cpu][i] for i in (0, 1))
        idle += total <= 0 or busy / total <= BUSY_SHARE
    return max(1, idle)


@functools.cache
def default_threads() -> int:
    """idle_cpus(), measured once per process: before its own threads run (they would count as busy)."""
    return idle_cpus()
