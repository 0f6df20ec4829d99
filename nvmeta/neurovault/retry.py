"""The one bounded re-attempt loop of the NeuroVault sources.

urllib3's ``Retry`` (configured in :mod:`nvmeta.neurovault.http`) retries a *request* up to its
response headers. What it cannot see is re-attempted here, always through :func:`retry`: a JSON
reply or a file whose body is cut short or reset after the headers, and a file that fails
verification (fetched once more unless the second copy is the same bytes). One loop, so that the
number of attempts, the pause between them and the log line are the same everywhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: longest pause between two attempts, seconds
MAX_PAUSE = 10.0

__all__ = ["MAX_PAUSE", "retry"]


def retry(
    call: Callable[[int], T],
    *,
    attempts: int,
    retry_on: type[BaseException] | tuple[type[BaseException], ...],
    what: str,
    again: str,
    log: logging.Logger,
    backoff: float = 0.0,
    give_up: Callable[[BaseException, int], BaseException] | None = None,
    stop: Callable[[BaseException], bool] | None = None,
    describe: Callable[[BaseException], str] = str,
) -> T:
    """Return ``call(attempt)`` for the first attempt (1, 2, ...) that does not raise ``retry_on``.

    Parameters
    ----------
    call : callable
        Called with the attempt number.
    attempts : int
        Bound on calls (at least 1).
    retry_on : exception type(s)
        What triggers another attempt; anything else propagates at once.
    what : str
        Subject of the warning logged before each new attempt (``"{what}: {reason}; {again}"``).
    again : str
        E.g. ``"asking again"``.
    log : logging.Logger
    backoff : float
        Pause before attempt k+1 is ``backoff * 2**(k-1)`` seconds, at most :data:`MAX_PAUSE`.
    give_up : callable, optional
        ``(exc, attempt) -> exception`` raised (``from None``) when the attempts are spent; by default
        the last exception itself is re-raised.
    stop : callable, optional
        ``exc -> bool``: give up before the bound (e.g. the same bad bytes twice).
    describe : callable
        Reason text of an exception for the warning.
    """
    n = max(1, int(attempts))
    for attempt in range(1, n + 1):
        try:
            return call(attempt)
        except retry_on as exc:
            if attempt == n or (stop is not None and stop(exc)):
                if give_up is None:
                    raise
                raise give_up(exc, attempt) from None
            log.warning("%s: %s; %s", what, describe(exc), again)
            if backoff > 0:
                time.sleep(min(backoff * 2 ** (attempt - 1), MAX_PAUSE))
    raise AssertionError("unreachable")
