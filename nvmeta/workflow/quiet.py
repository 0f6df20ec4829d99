"""Known dependency warnings, silenced where they arise, with one line in the job's log saying why.

A warning that is understood and harmless in the one place nvmeta triggers it (NiMARE's deprecation of
``Dataset`` in NiMARE 0.22, which nvmeta pins; NiMARE's note that a new masker replaces its default one)
would otherwise be repeated in every job's log and read as a problem. :func:`quiet` silences only the
given message, only inside its block, counts what it silenced and logs that count once, with the reason.
Anything else still reaches the log.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Known", "quiet"]

logger = logging.getLogger(__name__)


@dataclass
class Known:
    """One understood message: a Python warning (``category``) or a record of logger ``logger_name``."""

    message: str  # regular expression, matched at the start of the message
    why: str
    category: type[Warning] | None = None
    logger_name: str | None = None
    count: int = field(default=0, init=False)


class _RecordFilter(logging.Filter):
    def __init__(self, known: list[Known]):
        super().__init__()
        self.known = known

    def filter(self, record: logging.LogRecord) -> bool:
        for k in self.known:
            if re.match(k.message, record.getMessage()):
                k.count += 1
                return False
        return True


@contextlib.contextmanager
def quiet(*known: Known, log: logging.Logger | None = None) -> Iterator[None]:
    """Silence the ``known`` messages inside the block; afterwards log, once each, how many and why."""
    log = log or logger
    for k in known:
        k.count = 0
    filters = {}
    for k in known:
        if k.logger_name is not None:
            filters.setdefault(k.logger_name, _RecordFilter([])).known.append(k)
    for name, flt in filters.items():
        logging.getLogger(name).addFilter(flt)
    try:
        # the process' filters still decide what is shown; what they let through is recorded here
        with warnings.catch_warnings(record=True) as caught:
            yield
        for w in caught:
            hit = next(
                (k for k in known if k.category is not None and issubclass(w.category, k.category)
                 and re.match(k.message, str(w.message))),
                None,
            )  # fmt: skip
            if hit is not None:
                hit.count += 1
            else:  # not one of ours: shown as it would have been
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    finally:
        for name, flt in filters.items():
            logging.getLogger(name).removeFilter(flt)
        for k in known:
            if k.count:
                log.info("silenced %d known message(s) %r: %s", k.count, k.message, k.why)
