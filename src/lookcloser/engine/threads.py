"""CPU threads that follow what other processes leave free.

torch runs one OpenMP thread per core by default, and idle OpenMP threads spin while they
wait for the next operation. Two such processes on the same cores (two trainings, or a
training beside a busy loader) spin against each other: the demo took 5.8x its idle time
beside a second training on 2 cores (docs/benchmarks.md, demo-time). This callback measures,
every few seconds, how many cores the rest of the machine keeps busy and sets torch's
intra-op threads to the cores left free (at least 1, at most the starting count), so a
shared machine is shared instead of fought over, and a run that is alone again speeds back
up. It reads Linux's /proc/stat; elsewhere it does nothing.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

PROC_STAT = Path("/proc/stat")


def busy_cpu_seconds(stat: Path = PROC_STAT) -> float | None:
    """CPU seconds all cores have spent not idle since boot (None where /proc/stat is absent)."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    ticks = [int(x) for x in fields[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def threads_for(free_cores: float, most: int) -> int:
    """Threads to use when `free_cores` cores are left by other processes (1..most)."""
    return max(1, min(most, math.floor(free_cores + 0.5)))


class CPUThreads(L.Callback):
    """torch's CPU threads during training: a fixed count, or (`None`) the cores other
    processes leave free, re-checked every `interval` seconds; restored when training ends."""

    def __init__(
        self,
        fixed: int | None = None,
        interval: float = 5.0,
        busy: Callable[[], float | None] = busy_cpu_seconds,
        own: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        self.interval = interval
        self.busy, self.own, self.clock = busy, own, clock
        self.fixed = fixed
        self.most = torch.get_num_threads()
        self.cores = os.cpu_count() or self.most
        self._last: tuple[float, float, float] | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        """Remember the process's thread count (and apply a fixed one)."""
        self.most = torch.get_num_threads()
        if self.fixed is not None:
            torch.set_num_threads(self.fixed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Re-check the machine's load at most every `interval` seconds."""
        now = self.clock()
        if self.fixed is not None or (self._last and now - self._last[0] < self.interval):
            return
        busy, own = self.busy(), self.own()
        if busy is None:
            return
        if self._last is not None:
            wall = now - self._last[0]
            # Cores used by everything but this process (its loader workers count as others).
            others = max(0.0, (busy - self._last[1]) - (own - self._last[2])) / wall
            threads = threads_for(self.cores - others, self.most)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        self._last = (now, busy, own)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """Leave the process with the thread count it had (a notebook keeps running)."""
        torch.set_num_threads(self.most)
