"""threads= (issue 35, part 1): a fixed count, or on the CPU a ThreadTuner that follows the cores the
process actually gets. The tuner is driven here by a fake clock and CPU-time counter, one 3-second
measurement window at a time, so each decision is checked without timing anything."""
from __future__ import annotations

import types

import pytest
import torch

from imgcls import process


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class Machine:
    """Wall clock and this process's CPU seconds, advanced by hand."""

    def __init__(self, monkeypatch):
        self.now = self.cpu = 1000.0
        monkeypatch.setattr(process, "time", types.SimpleNamespace(monotonic=lambda: self.now))
        monkeypatch.setattr(process, "_cpu_seconds", lambda: self.cpu)

    def window(self, tuner: process.ThreadTuner, *, rate: float, cores_got: float) -> int:
        """One window of training steps at `rate` images/s while the process gets `cores_got` cores;
        returns the thread count the tuner leaves."""
        self.now += tuner.WINDOW
        self.cpu += tuner.WINDOW * cores_got
        tuner.observe(int(rate * tuner.WINDOW), tuner.WINDOW)
        return tuner.threads

    def wait(self, seconds: float) -> None:
        self.now += seconds

    def tuner(self, *, cores: int, threads: int) -> process.ThreadTuner:
        """A tuner on this clock, starting from `threads` torch threads."""
        torch.set_num_threads(threads)
        return process.ThreadTuner(cores=cores)


def test_alone_the_tuner_keeps_every_core(monkeypatch):
    machine = Machine(monkeypatch)
    tuner = machine.tuner(cores=2, threads=2)
    assert [machine.window(tuner, rate=100, cores_got=1.9) for _ in range(50)] == [2] * 50
    assert torch.get_num_threads() == 2


def test_starved_it_tries_one_thread_fewer_and_keeps_it_only_when_faster(monkeypatch):
    machine = Machine(monkeypatch)
    tuner = machine.tuner(cores=2, threads=2)
    assert machine.window(tuner, rate=30, cores_got=1.2) == 1  # half a core short: another process holds one
    assert machine.window(tuner, rate=32, cores_got=1.0) == 2  # not 10% faster: back to 2
    assert tuner.wait == 2 * tuner.FIRST_TRY  # and the next try up waits longer
    assert machine.window(tuner, rate=30, cores_got=1.2) == 1
    assert machine.window(tuner, rate=60, cores_got=1.0) == 1  # twice as fast: kept
    assert torch.get_num_threads() == 1


def test_with_fewer_threads_than_cores_it_tries_one_more_now_and_then(monkeypatch):
    machine = Machine(monkeypatch)
    tuner = machine.tuner(cores=2, threads=1)
    assert machine.window(tuner, rate=60, cores_got=1.0) == 1  # not before FIRST_TRY seconds
    machine.wait(tuner.FIRST_TRY)
    assert machine.window(tuner, rate=60, cores_got=1.0) == 2  # the other process may have ended
    assert machine.window(tuner, rate=62, cores_got=1.9) == 1  # it has not: no 10% gain, back to 1
    machine.wait(2 * tuner.FIRST_TRY)
    assert machine.window(tuner, rate=60, cores_got=1.0) == 2
    assert machine.window(tuner, rate=110, cores_got=1.95) == 2  # it has: the core is taken back
    assert machine.window(tuner, rate=110, cores_got=1.95) == 2


def test_a_fixed_count_or_deterministic_runs_without_a_tuner_and_the_count_is_restored(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    with process.cpu_threads("auto", device="cpu", deterministic=False) as tuner:
        assert isinstance(tuner, process.ThreadTuner)
    for setting, kwargs in [(1, dict(device="cpu", deterministic=False)),
                            ("auto", dict(device="cpu", deterministic=True)),
                            ("auto", dict(device="cuda", deterministic=False))]:
        with process.cpu_threads(setting, **kwargs) as tuner:
            assert tuner is None and torch.get_num_threads() == (1 if setting == 1 else 2)
        assert torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's OMP_NUM_THREADS is a fixed count
    with process.cpu_threads("auto", device="cpu", deterministic=False) as tuner:
        assert tuner is None and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
