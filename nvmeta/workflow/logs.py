"""Per-job log files: every record of the ``nvmeta`` logger tree reaches the job's ``log:`` file.

Modules log through their own logger (``logging.getLogger(__name__)``, a child of ``nvmeta``).
A job attaches one file handler to the ``nvmeta`` logger for its duration, so whatever any module
logs while the job runs lands in that job's log, whichever module it comes from.

* Script jobs (``script:``, one process per job): :func:`job_logger` also echoes records to
  stderr, and an uncaught exception writes its traceback to the log file and one line to the
  terminal, so that the tracebacks of parallel jobs never interleave there (Snakemake's
  ``show-failed-logs`` prints each failed job's log as one block).
* Per-image jobs (``run:`` in threads of the Snakemake process, see :mod:`nvmeta.workflow.jobs`):
  :class:`job_log` filters its handler on the job's thread, so parallel jobs' records never mix.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback

__all__ = ["job_log", "job_logger"]

ROOT = "nvmeta"
_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s")


class _OneLineFormatter(logging.Formatter):
    """Terminal format: the message only, never a multi-line traceback (that goes to the log file)."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _root() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return root


def _file_handler(path: str | os.PathLike) -> logging.FileHandler:
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(_FORMAT)
    return handler


def job_logger(name: str, path: str | os.PathLike | None = None) -> logging.Logger:
    """Set up logging for a script job (its own process) and return logger ``name``.

    Records of every ``nvmeta.*`` logger go to ``path`` (the rule's ``log:`` file, truncated)
    and to stderr; Python warnings are captured too. An uncaught exception is logged with its
    traceback to ``path`` and as one line to stderr.

    Parameters
    ----------
    name : str
        Logger name (e.g. ``"nvmeta.select.query"``).
    path : path-like, optional
        Log file; created (truncated) for this job.
    """
    handlers: list[logging.Handler] = [] if path is None else [_file_handler(path)]
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
    handlers.append(stream)
    logging.captureWarnings(True)
    # The nvmeta tree and Python warnings (logger "py.warnings") both reach the job's log.
    for target in (_root(), logging.getLogger("py.warnings")):
        for handler in list(target.handlers):  # a second call in the same process replaces the first
            target.removeHandler(handler)
            handler.close()
        for handler in handlers:
            target.addHandler(handler)
    logging.getLogger("py.warnings").propagate = False
    logger = logging.getLogger(name)

    def excepthook(exc_type, exc, tb) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            # Ctrl-C reaches every job at once: one line in this job's log, none on the terminal,
            # where Snakemake reports the interrupted jobs itself.
            root = logging.getLogger(ROOT)
            for handler in list(root.handlers):
                if not isinstance(handler, logging.FileHandler):  # log file only, not the terminal
                    root.removeHandler(handler)
            logger.warning("interrupted (Ctrl-C)")
            return
        where = f" (traceback in {os.fspath(path)})" if path is not None else ""
        logger.error("%s: %s%s", exc_type.__name__, exc, where, exc_info=(exc_type, exc, tb))
        if path is None:
            traceback.print_exception(exc_type, exc, tb)

    sys.excepthook = excepthook
    return logger


class job_log:  # noqa: N801 - used as a context manager, reads like a function
    """Context manager: logging of one per-image job running in a thread of the Snakemake process.

    Attaches a handler on ``path`` to the ``nvmeta`` logger that accepts only records from the
    current thread (with ``echo``, a second one writing them to stderr in one-line form, as
    :func:`job_logger` does for script jobs), yields logger ``name``, and on exit logs an escaping
    exception (with its traceback) to the file, closes it and forgets the logger (thousands of
    jobs per run).
    """

    def __init__(self, name: str, path: str | os.PathLike | None, echo: bool = False) -> None:
        self.name = name
        self.path = path
        self.echo = echo
        self.handlers: list[logging.Handler] = []

    def __enter__(self) -> logging.Logger:
        self.logger = logging.getLogger(self.name)
        ident = threading.get_ident()
        if self.path is not None:
            self.handlers.append(_file_handler(self.path))
        if self.echo:  # as a script job's records reach the terminal (job_logger)
            stream = logging.StreamHandler(sys.stderr)
            stream.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
            self.handlers.append(stream)
        for handler in self.handlers:
            handler.addFilter(lambda record: record.thread == ident)
            _root().addHandler(handler)
        return self.logger

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            self.logger.error("%s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb))
        for handler in self.handlers:
            logging.getLogger(ROOT).removeHandler(handler)
            handler.close()
        self.handlers = []
        logging.Logger.manager.loggerDict.pop(self.name, None)
