"""nvmeta.snakemake_timers: the scheduler's rate-limit timers no longer hold the process at exit."""

from __future__ import annotations

import threading
import types

from nvmeta.snakemake_timers import cancel_scheduler_timers


def test_the_pinned_snakemakes_timer_is_cancelled_and_never_wakes_the_scheduler():
    """Snakemake's own method starts the timer (on a stand-in scheduler that has only what the
    method uses): it is found, cancelled, its thread ends, the scheduler is never woken; another
    timer of the process is left alone."""
    from snakemake.scheduling.job_scheduler import JobScheduler

    scheduler = types.SimpleNamespace(_open_jobs=threading.Semaphore(0))
    before = set(threading.enumerate())
    JobScheduler._schedule_reevalutation(scheduler, 60)
    (timer,) = (t for t in threading.enumerate() if t not in before)
    assert isinstance(timer, threading.Timer) and not timer.daemon  # what holds the exit
    other_fired = threading.Event()
    other = threading.Timer(60, other_fired.set)
    other.start()
    try:
        assert cancel_scheduler_timers() == 1
        timer.join(timeout=30)
        assert not timer.is_alive()
        assert not scheduler._open_jobs.acquire(blocking=False)  # its action did not run
        assert other.is_alive()
    finally:
        other.cancel()
        other.join(timeout=30)
    assert not other_fired.is_set()
    assert cancel_scheduler_timers() == 0
