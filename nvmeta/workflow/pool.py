"""A warm pool of worker processes for the per-image jobs of one Snakemake process.

Per-image jobs are ``run:`` jobs in threads of the Snakemake process (no interpreter start-up
per image), but threads share one interpreter lock with each other and with Snakemake's
scheduler. :func:`run_in_worker` hands a job's work to a worker process instead: the job's
thread sends the task (a module-level function and its plain arguments) down a pipe and waits
for the reply, which releases the lock; the work runs on a core of its own.

* **Warm.** A worker is an interpreter started once, lazily, that has imported what the tasks
  need (:data:`PRELOAD`) and keeps its caches (the template mask) from task to task.
* **One worker per job.** A job checks out an idle worker, runs its task there and returns it.
  There are never more workers than the cores Snakemake was given (``workers``), and Snakemake
  never runs more z-map jobs than that at once, so no job waits for a worker.
* **Failures stay with their image.** An exception in a task is raised in its job (the worker
  lives on); a worker that dies (killed, out of memory, a crash in C code) fails only the job it
  was running, with a message naming how it ended, and a new worker takes its place.
* **Bounded memory.** A worker is replaced after :data:`MAX_TASKS` tasks.
* **Ctrl-C and exits.** Workers ignore SIGINT, from the moment they start (it is blocked while
  they are spawned): the terminal sends it to its whole foreground process group, workers
  included, and it is Snakemake's to handle. Snakemake stops its jobs, waiting for the images in
  progress (one per worker), and the workers are stopped when the Snakemake process exits. They
  stay in Snakemake's process group, so a signal to the group (kill, Ctrl-Z, a job scheduler's
  SIGTERM) reaches them too; a worker whose parent alone was killed exits when it next reads its
  pipe. Workers print nothing of their own.

Why not :class:`concurrent.futures.ProcessPoolExecutor` or :mod:`multiprocessing`: with
``max_tasks_per_child`` that executor can stop replacing workers and hang (CPython issue
gh-115634, fixed only in 3.13.x); one dead worker breaks every pending future of the executor (a
crash on one image would fail the images running beside it); and multiprocessing's ``spawn`` and
``forkserver`` workers import the parent's main script again, which runs it a second time when
Snakemake is driven from a user's script without a ``__main__`` guard. A worker here is
``python -c`` with the parent's ``sys.path`` and two pipes carrying pickled tasks and replies.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

__all__ = ["WorkerDied", "WorkerPool", "run_in_worker", "shared_pool"]

logger = logging.getLogger(__name__)

#: What a worker imports when it starts, before its first task.
PRELOAD = (
    "nvmeta.workflow.jobs",
    "nvmeta.images.zmap",
    "nvmeta.images.stats",
    "nvmeta.images.resample",
    "nvmeta.images.effectsize",
    "nvmeta.images.template",
    "nvmeta.images.download",
    "nvmeta.workflow.config",
    "scipy.ndimage",
)
#: Tasks per worker before it is replaced (its memory then goes back to the system).
MAX_TASKS = 100

# The worker's whole command line: the parent's import path, then the serving loop.
_BOOT = (
    "import sys; sys.path[:] = sys.argv[3:]; from nvmeta.workflow.pool import serve; serve(*sys.argv[1:3])"
)


class WorkerDied(RuntimeError):
    """The worker process running a task ended before it replied."""


def serve(task_fd: str | int, reply_fd: str | int) -> None:
    """A worker's loop: run pickled ``(fn, args, kwargs)`` tasks from ``task_fd`` until ``None`` or EOF,
    writing ``(True, result)`` or ``(False, exception)`` to ``reply_fd``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is Snakemake's to handle, not a worker's
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent until now
    for name in PRELOAD:
        importlib.import_module(name)
    with os.fdopen(int(task_fd), "rb") as tasks, os.fdopen(int(reply_fd), "wb") as replies:
        while True:
            try:
                task = pickle.load(tasks)
            except (EOFError, OSError):  # the parent is gone
                return
            except Exception as exc:  # noqa: BLE001 - a task that cannot be unpickled is its job's error
                task = (_raise, (exc,), {})
            if task is None:
                return
            fn, args, kwargs = task
            try:
                reply = (True, fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to its job
                reply = (False, _transportable(exc))
            try:
                data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:  # noqa: BLE001 - an unpicklable result
                data = pickle.dumps((False, RuntimeError(f"the task's result cannot be sent back: {exc}")))
            try:
                replies.write(data)
                replies.flush()
            except OSError:
                return


def _raise(exc: BaseException) -> None:
    raise exc


def _transportable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class _Worker:
    """One worker process and the parent's ends of its two pipes."""

    def __init__(self) -> None:
        task_r, task_w = os.pipe()
        reply_r, reply_w = os.pipe()
        # A Ctrl-C while the new interpreter starts would end it with a traceback: SIGINT stays
        # blocked in it (the mask of this thread is inherited) until serve() ignores it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(task_r), str(reply_w), *sys.path],
                stdin=subprocess.DEVNULL,
                pass_fds=(task_r, reply_w),
            )
        except BaseException:
            for fd in (task_w, reply_r):
                os.close(fd)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(task_r)
            os.close(reply_w)
        self.tasks: BinaryIO = os.fdopen(task_w, "wb")
        self.replies: BinaryIO = os.fdopen(reply_r, "rb")
        self.done = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def call(self, fn: Callable, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        data = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.tasks.write(data)
            self.tasks.flush()
            reply = pickle.load(self.replies)
        except (EOFError, OSError, pickle.UnpicklingError):
            try:
                code = self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise WorkerDied(f"worker process {self.pid} died ({how}) before it finished") from None
        self.done += 1
        return reply

    def stop(self, timeout: float = 10.0) -> None:
        """Close the pipes (the worker ends at EOF) and wait for the process; kill it if it hangs."""
        for f in (self.tasks, self.replies):
            try:
                f.close()
            except OSError:  # the worker is already gone
                pass
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class WorkerPool:
    """Up to ``workers`` worker processes, each used by one caller at a time (see the module docstring).

    Parameters
    ----------
    workers : int
        Most workers alive and tasks running at once; a caller beyond that waits for a free worker.
    max_tasks : int
        Tasks per worker before it is replaced.
    """

    def __init__(self, workers: int, max_tasks: int = MAX_TASKS) -> None:
        if workers < 1 or max_tasks < 1:
            raise ValueError(f"workers and max_tasks must be at least 1, not {workers} and {max_tasks}")
        self.workers, self.max_tasks = workers, max_tasks
        self._slots = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._started = 0
        self._closed = False

    def run(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Return ``fn(*args, **kwargs)`` computed in a worker; its exception is raised here.

        ``fn`` must be importable by name (a module-level function) and the arguments and result
        picklable. Raises :class:`WorkerDied` when the worker ends before replying.
        """
        with self._slots:
            worker = self._checkout()
            try:
                ok, value = worker.call(fn, args, kwargs)
            except BaseException:
                self._retire(worker)
                raise
            self._checkin(worker)
        if ok:
            return value
        raise value

    def _checkout(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                self._started += 1
        if worker is None:  # started outside the lock: other jobs need not wait for it
            worker = _Worker()
        with self._lock:
            self._busy.add(worker)
        return worker

    def _checkin(self, worker: _Worker) -> None:
        with self._lock:
            if worker.done < self.max_tasks and not self._closed:
                self._busy.discard(worker)
                self._idle.append(worker)
                return
        self._retire(worker)

    def _retire(self, worker: _Worker) -> None:
        worker.stop()
        with self._lock:
            self._busy.discard(worker)

    def close(self) -> None:
        """Stop the idle workers; a busy one stops when its task returns."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.stop()

    @property
    def started(self) -> int:
        """How many worker processes this pool has started so far."""
        return self._started

    def pids(self) -> list[int]:
        """Process ids of the live workers, idle and busy."""
        with self._lock:
            return [w.pid for w in [*self._idle, *self._busy]]


_SHARED: WorkerPool | None = None
_SHARED_LOCK = threading.Lock()


def shared_pool(workers: int) -> WorkerPool:
    """This process's pool, created on first use with ``workers`` workers and closed at exit."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = WorkerPool(workers)
            atexit.register(_SHARED.close)
            logger.debug("worker pool of up to %d processes for process %d", workers, os.getpid())
        return _SHARED


def run_in_worker(fn: Callable, /, *args: Any, workers: int, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a worker of this process's pool, or right here when ``workers`` <= 1.

    With one core there is nothing to run beside, so a job then costs no traffic between processes;
    a submitted cluster job (its z-maps one at a time) runs its tasks inline too.
    """
    if workers <= 1:
        return fn(*args, **kwargs)
    return shared_pool(workers).run(fn, *args, **kwargs)
