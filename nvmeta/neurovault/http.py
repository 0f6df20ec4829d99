"""The HTTP source: NeuroVault's REST API (or the fixture server) on a ``requests.Session``.

Polite (bounded connections, a User-Agent), retrying (urllib3 ``Retry`` for the request; the
shared :func:`~nvmeta.neurovault.retry.retry` for bodies cut short) and bounded (sizes, pages,
Retry-After).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from nvmeta.neurovault.base import BaseClient, logger
from nvmeta.neurovault.errors import (
    CorruptFile,
    Forbidden,
    NeuroVaultError,
    NotFound,
    NotJSON,
    OfflineError,
    ServerError,
    TooLarge,
    UnsafeInput,
    _Truncated,
)
from nvmeta.neurovault.retry import retry
from nvmeta.neurovault.urls import NEUROVAULT_HOSTS, canonical_url, short_url
from nvmeta.neurovault.verify import loads_record

#: cap on a server's Retry-After (seconds); a longer wait fails the request instead of hanging a job
RETRY_AFTER_MAX = 120

__all__ = ["RETRY_AFTER_MAX", "HTTPClient"]


class HTTPClient(BaseClient):
    """Client of the real API (or the fixture server) on a ``requests.Session``.

    Parameters
    ----------
    url : str
        API root (``https://neurovault.org/api/``).
    timeout : float or (float, float)
        Connect and read timeouts in seconds.
    retries : int
        urllib3 ``Retry(total=retries)``: connection errors, read timeouts, 429/500/502/503/504
        (``Retry-After`` honoured, capped at :data:`RETRY_AFTER_MAX` s).
    backoff : float
        urllib3 ``backoff_factor``; also the base of the body re-attempt pause.
    max_connections : int
        Connections kept and used at once by this process (pool blocks beyond it).
    max_file_bytes, max_json_bytes : int
        Size bounds.
    user_agent : str, optional
    offline : bool
        Refuse every network call (:class:`OfflineError`).
    download_attempts : int
        Attempts of a file whose body is cut short or reset (urllib3 does not retry those).
    log : callable or Logger, optional
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float | tuple[float, float],
        retries: int,
        backoff: float,
        max_connections: int,
        max_file_bytes: int,
        max_json_bytes: int,
        user_agent: str,
        download_attempts: int,
        mode: str = "download_new",
        offline: bool = False,
        log: logging.Logger | None = None,
    ) -> None:
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        super().__init__()
        url = canonical_url(url)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"neurovault.url must be an http(s) URL or a snapshot directory, got {url!r}")
        self.base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/", "", ""))
        self.timeout = (
            (float(timeout[0]), float(timeout[1]))
            if isinstance(timeout, list | tuple)
            else (float(timeout), float(timeout))
        )
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_file_bytes = int(max_file_bytes)
        self.max_json_bytes = int(max_json_bytes)
        self.offline = bool(offline) or mode == "offline"
        self.mode = mode
        self.download_attempts = max(1, int(download_attempts))
        self.log = log or logger
        self._netlocs = {parts.netloc.lower()}
        if (parts.hostname or "").lower() in NEUROVAULT_HOSTS:
            self._netlocs |= set(NEUROVAULT_HOSTS)
        retry_kw: dict[str, Any] = {
            "total": self.retries,
            "backoff_factor": self.backoff,
            "status_forcelist": (429, 500, 502, 503, 504),
            "allowed_methods": frozenset({"GET", "HEAD"}),
            "respect_retry_after_header": True,
            "raise_on_status": False,
        }
        if "retry_after_max" in inspect.signature(Retry).parameters:
            retry_kw["retry_after_max"] = RETRY_AFTER_MAX
        n = max(1, int(max_connections))
        adapter = HTTPAdapter(
            max_retries=Retry(**retry_kw), pool_connections=n, pool_maxsize=n, pool_block=True
        )
        self.session = requests.Session()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.max_redirects = 10
        self.session.headers["User-Agent"] = user_agent
        self._requests = requests

    def close(self) -> None:
        """Close the session's connections."""
        self.session.close()

    def __enter__(self) -> HTTPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _allowed_netlocs(self) -> set[str]:
        return self._netlocs

    # -- one request (urllib3 retries inside) -------------------------------------------------------
    def _open(self, url: str, params: Mapping[str, Any] | None, accept: str) -> Any:
        if self.offline:
            raise OfflineError(f"offline mode: not fetching {url}", url)
        rq = self._requests.exceptions
        self.n_requests += 1
        try:
            r = self.session.get(
                url,
                params=params,
                timeout=self.timeout,
                stream=True,
                headers={
                    "Accept": accept,
                    "Accept-Encoding": "identity" if accept != "application/json" else "gzip, deflate",
                },
            )
        except rq.TooManyRedirects:
            raise ServerError(f"too many redirects (redirect loop?) for {short_url(url)}", url) from None
        except rq.InvalidSchema:
            raise UnsafeInput(f"redirected to a non-http(s) URL from {short_url(url)}", url) from None
        except rq.RetryError as e:
            raise ServerError(f"server error after {self.retries} retries ({_reason_of(e)})", url) from None
        except (rq.Timeout, rq.ConnectionError) as e:
            why = _reason_of(e)
            what = "timed out" if why == "timed out" else f"connection failed ({why})"
            raise ServerError(f"{what} after {self.retries} retries: {short_url(url)}", url) from None
        except rq.RequestException as e:
            raise ServerError(f"request failed ({type(e).__name__})", url) from None
        if r.history and urlsplit(url).netloc.lower() in self._netlocs:
            final = urlsplit(r.url)
            if final.scheme in ("http", "https"):
                self._netlocs.add(final.netloc.lower())  # a host the configured one redirected to
        code = r.status_code
        if code == 200:
            return r
        r.close()
        if code == 404:
            raise NotFound(f"not found (HTTP 404): {short_url(url)}", url)
        if code == 403:
            raise Forbidden(f"forbidden (HTTP 403, private collection?): {short_url(url)}", url)
        if code == 429 or code >= 500:
            raise ServerError(f"HTTP {code} after {self.retries} retries: {short_url(url)}", url)
        raise NeuroVaultError(f"HTTP {code}: {short_url(url)}", url)

    def _body_errors(self) -> tuple[type[BaseException], ...]:
        import urllib3

        rq = self._requests.exceptions
        return (
            rq.ChunkedEncodingError,
            rq.ConnectionError,
            rq.ContentDecodingError,
            rq.Timeout,
            urllib3.exceptions.HTTPError,
            ConnectionError,
            TimeoutError,
        )

    def _fetch_json(self, url: str, params: Mapping[str, Any] | None) -> Any:
        # The request itself is retried by urllib3; a reply whose body is cut short after the headers
        # is not, so re-ask a bounded number of times.
        def once(_attempt: int) -> tuple[bytes, str]:
            r = self._open(url, params, "application/json")
            with r:
                ctype = r.headers.get("Content-Type", "")
                declared = _int(r.headers.get("Content-Length"))
                if declared is not None and declared > self.max_json_bytes:
                    raise TooLarge(
                        f"JSON reply too large: {declared} bytes > max_json_bytes {self.max_json_bytes}"
                    )
                body = bytearray()
                for chunk in r.iter_content(1 << 16):
                    body += chunk
                    if len(body) > self.max_json_bytes:
                        raise TooLarge(f"JSON reply too large: > max_json_bytes {self.max_json_bytes}")
            return bytes(body), ctype

        body, ctype = retry(
            once,
            attempts=self.download_attempts,
            retry_on=self._body_errors(),
            what=short_url(url),
            again="asking again",
            log=self.log,
            backoff=self.backoff,
            describe=lambda e: f"reply cut short ({_reason_of(e)})",
            give_up=lambda e, n: ServerError(f"reply cut short {n} times ({_reason_of(e)})", url),
        )
        head = body[:256].lstrip().lower()
        if "html" in ctype.lower() or head.startswith((b"<!doctype", b"<html", b"<")):
            raise NotJSON("server returned HTML instead of JSON", url)
        try:
            return loads_record(body)
        except ValueError:
            raise NotJSON(f"invalid JSON reply from {short_url(url)}", url) from None

    def _fetch_to(self, url: str, path: Path, expected_size: int | None) -> tuple[str, int]:
        # urllib3's Retry covers the request up to the response headers (connection errors, timeouts,
        # 429/5xx). A body cut short or a connection reset mid-stream surfaces later, while reading,
        # and is not retried by it: re-attempt the whole file a bounded number of times.
        return retry(
            lambda _attempt: self._stream_once(url, path, expected_size),
            attempts=self.download_attempts,
            retry_on=_Truncated,
            what=short_url(url),
            again="downloading again",
            log=self.log,
            backoff=self.backoff,
            give_up=lambda e, n: CorruptFile(f"download incomplete after {n} attempts ({e})", url),
        )

    def _stream_once(self, url: str, path: Path, expected_size: int | None) -> tuple[str, int]:
        errors = self._body_errors()
        r = self._open(url, None, "*/*")
        with r:
            declared = _int(r.headers.get("Content-Length"))
            encoded = r.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
            if declared is not None and not encoded and declared > self.max_file_bytes:
                raise TooLarge(
                    f"file too large: {declared} bytes declared > max_file_bytes {self.max_file_bytes}", url
                )
            h = hashlib.md5()
            n = 0
            with open(path, "wb") as f:
                try:
                    for chunk in r.iter_content(1 << 20):
                        n += len(chunk)
                        if n > self.max_file_bytes:
                            raise TooLarge(
                                f"file too large: more than max_file_bytes {self.max_file_bytes}", url
                            )
                        h.update(chunk)
                        f.write(chunk)
                except errors as e:
                    raise _Truncated(f"connection broken mid-body: {_reason_of(e)}") from None
        if declared is not None and not encoded and n != declared:
            raise _Truncated(f"received {n} of {declared} bytes")
        if declared is None and isinstance(expected_size, int) and 0 < n < expected_size:
            raise _Truncated(f"received {n} of {expected_size} bytes (file_size)")
        return h.hexdigest(), n


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _reason_of(e: BaseException) -> str:
    """Innermost cause of a requests/urllib3 exception, short."""
    seen = e
    for _ in range(6):
        nxt = getattr(seen, "reason", None) or (
            seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None
        )
        if not isinstance(nxt, BaseException):
            break
        seen = nxt
    name = type(seen).__name__
    text = f"{e!r} {seen!r}".lower()
    if "timeout" in name.lower() or "timed out" in text:
        return "timed out"
    if "reset" in text:
        return "connection reset"
    if "refused" in text:
        return "connection refused"
    if "incompleteread" in text or "incomplete read" in text:
        return "body cut short"
    if "remotedisconnected" in text or "without response" in text:
        return "connection closed without reply"
    return name
