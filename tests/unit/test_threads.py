"""CPUThreads: torch's threads follow the cores other processes leave free."""

from __future__ import annotations

import pytest
import torch

from lookcloser.engine.threads import CPUThreads, busy_cpu_seconds, threads_for


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_for_rounds_and_clamps():
    assert threads_for(2.0, 2) == 2
    assert threads_for(1.4, 4) == 1
    assert threads_for(0.2, 4) == 1  # never zero
    assert threads_for(7.9, 4) == 4  # never more than the starting count


def _drive(callback, samples):
    """Feed (wall, machine busy, own cpu) samples, one batch each; return threads after each."""
    it = iter(samples)
    current = {}
    callback.clock = lambda: current["wall"]
    callback.busy = lambda: current["busy"]
    callback.own = lambda: current["own"]
    seen = []
    for wall, busy, own in it:
        current.update(wall=wall, busy=busy, own=own)
        callback.on_train_batch_start(None, None, None, 0)
        seen.append(torch.get_num_threads())
    return seen


def test_threads_drop_when_another_process_is_busy_and_come_back(restore_threads):
    torch.set_num_threads(2)
    callback = CPUThreads(interval=5.0)
    callback.cores, callback.most = 2, 2
    seen = _drive(
        callback,
        [
            (0.0, 100.0, 10.0),  # first sample: nothing to compare yet
            (5.0, 110.0, 20.0),  # 10 s busy, 10 s ours: others use 0 cores -> 2 threads
            (10.0, 120.0, 25.0),  # 10 s busy, 5 s ours: others use 1 core -> 1 thread
            (12.0, 121.0, 26.0),  # within the interval: not re-checked
            (15.0, 130.0, 30.0),  # others use 1 core again -> still 1
            (20.0, 140.0, 40.0),  # the other process ended -> 2 threads again
        ],
    )
    assert seen == [2, 2, 1, 1, 1, 2]


def test_fixed_count_is_applied_and_restored(restore_threads):
    torch.set_num_threads(2)
    callback = CPUThreads(fixed=1)
    callback.on_fit_start(None, None)
    assert torch.get_num_threads() == 1
    callback.on_train_batch_start(None, None, None, 0)
    assert torch.get_num_threads() == 1
    callback.teardown(None, None, "fit")
    assert torch.get_num_threads() == 2


def test_proc_stat_parsing(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal, in clock ticks
    stat.write_text("cpu  100 0 50 1000 30 0 10 0 0 0\ncpu0 1 2 3\n")
    import os

    assert busy_cpu_seconds(stat) == pytest.approx(160 / os.sysconf("SC_CLK_TCK"))
    assert busy_cpu_seconds(tmp_path / "absent") is None


def test_deterministic_runs_keep_a_fixed_thread_count(restore_threads):
    from lookcloser.engine.trainer import _fixed_threads

    torch.set_num_threads(2)
    assert _fixed_threads("auto", deterministic=False) is None  # follows the machine
    assert _fixed_threads("auto", deterministic=True) == 2  # results must not follow its load
    assert _fixed_threads(3, deterministic=True) == 3
