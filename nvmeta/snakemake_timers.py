"""Let the Snakemake process exit when its last job is done, not a second later.

Why this module exists (a workaround, measured, for Snakemake 9.27.1): on every pass of its loop
that has a job rate limit (``--max-jobs-per-timespan``, default ``100/1s``), Snakemake's scheduler
(``JobScheduler._schedule_reevalutation`` in ``snakemake/scheduling/job_scheduler.py``) starts a
``threading.Timer`` of that timespan whose only action is to wake the scheduler again. The timers
are not daemon threads, so at exit the interpreter waits for the last one: on the 21 demo pain
maps the process ended 1.0 s after its last job had finished (10 % of the whole run; measured
with a wrapper stamping ``snakemake.cli.main``'s return and the last ``atexit`` hook: 8.90 s
and 9.90 s). :func:`cancel_scheduler_timers`, called from the workflow's ``onsuccess`` and
``onerror`` hooks (``workflow/rules/common.smk``; the scheduler has finished when they run),
cancels those timers. If a later Snakemake names the method differently nothing matches and
the process simply waits as before (``tests/test_snakemake_timers.py`` checks the pinned one).
"""

from __future__ import annotations

import threading

__all__ = ["cancel_scheduler_timers"]

#: The qualified name the scheduler's timer callbacks start with (a lambda in that method).
SCHEDULER_TIMER = "JobScheduler._schedule_reevalutation."


def cancel_scheduler_timers() -> int:
    """Cancel the pending re-evaluation timers of Snakemake's job scheduler.

    Returns
    -------
    int
        How many timers were cancelled (other timers of the process are left alone).
    """
    cancelled = 0
    for thread in threading.enumerate():
        function = getattr(thread, "function", None)
        if isinstance(thread, threading.Timer) and getattr(function, "__qualname__", "").startswith(
            SCHEDULER_TIMER
        ):
            thread.cancel()
            cancelled += 1
    return cancelled
