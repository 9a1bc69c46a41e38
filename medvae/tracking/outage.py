"""Reaching the tracking server: the one short check before use, what counts as an outage, and
:class:`TrackingUnavailable`, the soft failure (exit status :data:`EXIT_TRACKING_SKIPPED`) that lets
the work go on.
"""
from __future__ import annotations

import re
from urllib.parse import urlsplit

from medvae.errors import MedvaeError
from medvae.tracking.uri import _is_remote, _scheme, redact, redact_text

#: exit status of a command whose local outputs were written but whose MLflow logging was skipped
#: because the tracking server could not be reached (bad input is 2)
EXIT_TRACKING_SKIPPED = 3

#: seconds the one reachability check of a remote server may take
CHECK_TIMEOUT_S = 3.0

#: default ports of the database servers, for the reachability check
_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


class TrackingUnavailable(Exception):
    """The tracking server could not be used; the work itself went on.

    Parameters
    ----------
    uri : the tracking URI (credentials removed).
    reason : why, in a few words (``connection refused``, ``no answer within 3 s``, ``HTTP 503``).
    left_running : the id of a run the server holds part of the record in and that could not be ended
        (the server stopped answering after the run was made): named, so that it can be deleted.
    """

    def __init__(self, uri: str, reason: str, *, left_running: str | None = None) -> None:
        self.uri, self.reason = redact(uri), redact_text(" ".join(str(reason).split()))
        self.left_running = left_running
        text = f"tracking skipped: {self.uri} is unavailable ({self.reason})"
        if left_running:  # a half-logged run shown as RUNNING, with real-looking scores, for good
            text += (f"; its run {left_running} holds part of this record and is still marked RUNNING there: "
                     f"delete it once the server answers (mlflow runs delete --run-id {left_running})")
        super().__init__(text)


def _is_db_outage(uri: str, exc: BaseException) -> bool:
    """Whether a database server (not a local sqlite file) could not be reached."""
    if _scheme(uri) not in _DB_PORTS:
        return False
    low = str(exc).lower()
    return any(s in low for s in ("connection refused", "could not connect", "can't connect", "timed out",
                                  "timeout expired", "could not translate host name", "server closed the connection"))


def check_server(uri: str, *, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Raise :class:`TrackingUnavailable` unless a remote tracking server answers within ``timeout``.

    ``http``/``https`` URIs get one ``GET /health``; any answer below HTTP 500, an authentication
    request included, counts as reachable, except a 404 (no MLflow server there). A database server
    (``postgresql``, ``mysql``, ``mssql``) gets one TCP connection to its port, since MLflow would
    retry its engine for minutes. Local stores are not checked.

    Examples
    --------
    >>> check_server("sqlite:///mlruns/mlflow.db")      # local: nothing to check
    >>> check_server("http://127.0.0.1:9", timeout=1)   # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    medvae.tracking.outage.TrackingUnavailable: tracking skipped: http://127.0.0.1:9 is unavailable (connection refused)
    """
    if _scheme(uri) in _DB_PORTS:
        _check_database_server(uri, timeout)
        return
    if not _is_remote(uri):
        return
    import requests

    try:
        resp = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.exceptions.Timeout:
        raise TrackingUnavailable(uri, f"no answer within {timeout:g} s") from None
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
            requests.exceptions.MissingSchema) as exc:  # a typo in the URI, not an outage
        raise MedvaeError(f"not a tracking server URL ({outage_reason(exc)})", redact(uri)) from None
    except requests.exceptions.RequestException as exc:
        raise TrackingUnavailable(uri, outage_reason(exc)) from None
    if resp.status_code >= 500:
        raise TrackingUnavailable(uri, f"HTTP {resp.status_code} {resp.reason or ''}".strip())
    if resp.status_code == 404:  # something answers, but it is not an MLflow server
        raise TrackingUnavailable(uri, "HTTP 404 on /health: no MLflow server at this address")


def _check_database_server(uri: str, timeout: float) -> None:
    """Raise :class:`TrackingUnavailable` unless the database server of ``uri`` accepts a TCP connection."""
    import socket

    try:
        parts = urlsplit(uri)
        host, port = parts.hostname, parts.port or _DB_PORTS[_scheme(uri)]
    except ValueError:
        raise MedvaeError("not a database URL (bad host or port)", redact(uri)) from None
    if not host:  # a local socket (``postgresql:///db?host=/run/postgresql``): nothing to dial
        return
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except TimeoutError:
        raise TrackingUnavailable(uri, f"no answer within {timeout:g} s") from None
    except socket.gaierror:
        raise TrackingUnavailable(uri, "unknown host") from None
    except OSError as exc:
        raise TrackingUnavailable(uri, outage_reason(exc)) from None


def outage_reason(exc: BaseException) -> str:
    """A few words from a connection error (MLflow's or requests'), without its nested repr."""
    text = str(exc)
    low = text.lower()
    if "connection refused" in low:
        return "connection refused"
    if "timed out" in low or "timeout" in low:
        return "timed out"
    if "name or service not known" in low or "nodename nor servname" in low or "failed to resolve" in low:
        return "unknown host"
    code = (re.search(r"failed with error code (\d+)", text) or re.search(r"too many (\d{3}) error responses", text)
            or _SERVER_ERROR.search(text))
    if code:
        return f"HTTP {code.group(1)}"
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if m:
        return m.group(1).strip().lower()
    if "remote end closed" in low or "connection aborted" in low or "connection reset" in low:
        return "connection lost"
    first = redact_text(text.strip().splitlines()[0]) if text.strip() else type(exc).__name__
    return first if len(first) <= 160 else first[:160].rsplit(" ", 1)[0] + " ..."  # at a word, not mid-word


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the tracking server could not be reached (rather than a bad request)."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import requests
        from mlflow.exceptions import MlflowException
    except ImportError:  # mlflow is not installed (a bare GPU node): the records are kept, not sent
        return False
    if isinstance(exc, requests.exceptions.RequestException):
        return True

    if isinstance(exc, MlflowException):
        text = str(exc)
        return (text.startswith("API request to") or "Max retries exceeded" in text
                or _SERVER_ERROR.search(text) is not None  # a download's failures, wrapped: "500 Server Error"
                or exc.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"))
    return False


#: an HTTP 5xx answer as requests words it ("500 Server Error: Internal Server Error for url: ...")
_SERVER_ERROR = re.compile(r"\b(5\d\d) Server Error\b")
