"""The one retry policy of the storage layer: which errors are worth retrying, how long to wait, when to stop.

* **Permanent** errors raise :class:`StorageError` at once, as one line saying what failed, where,
  and how to fix it: missing or rejected credentials, access denied (403), a missing bucket, a
  malformed endpoint or URL, a file that must exist and does not. Retrying them only delays the
  same answer.
* Everything else is **transient** (timeouts, refused or reset connections, throttling such as
  ``SlowDown``/429/503, other 5xx, errors nobody classified) and is retried with exponential
  backoff and jitter until the operation's deadline; ``None`` retries without end (periodic
  checkpoint uploads, which must not stop training during an outage).

Callers either wrap one call (:func:`call`) or, for loops that retry rounds of work (uploading
the files still missing), hold an :class:`Attempts` and report each failed round to it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import StorageError
from .uri import one_line

log = logging.getLogger("ftcluster.storage")

T = TypeVar("T")

END_OF_RUN_S = 600.0  # default deadline of reads that must succeed (fetch); the output store takes output.final_upload_timeout

_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                      "NoAuthTokenError", "DefaultCredentialsError", "RefreshError"}
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                     "TokenRefreshRequired", "AuthFailure", "InvalidClientTokenId"}
_ACCESS_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "Forbidden"}
_MISSING_BUCKET_CODES = {"NoSuchBucket"}
_MALFORMED_ERRORS = {"ParamValidationError", "InvalidEndpointConfigurationError", "InvalidS3AddressingStyleError",
                     "InvalidRegionError", "UnknownSignatureVersionError", "InvalidURL"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests"}
_TRANSIENT_ERRORS = {"ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError", "ConnectionClosedError",
                     "ServerDisconnectedError", "ClientConnectorError", "ClientOSError"}


@dataclass(frozen=True)
class Permanent:
    """Why an error will not go away by retrying, and what the user should do."""

    problem: str
    fix: str


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes/contexts (s3fs wraps botocore errors in OSError)."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out and len(out) < 8:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _client_error(exc: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError; ('', 0) for anything else."""
    resp = getattr(exc, "response", None)
    if not isinstance(resp, dict):
        return "", 0
    code = str((resp.get("Error") or {}).get("Code") or "")
    status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
    try:
        return code, int(code) if code.isdigit() else int(status)
    except (TypeError, ValueError):
        return code, 0


def _fixes(where: str) -> dict[str, str]:
    if where.startswith(("s3://", "s3a://")):
        creds = ("set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role for this "
                 "process (never in storage_options)")
        return {"credentials": creds, "access": "give these credentials read/write access to the bucket and prefix",
                "missing": "check the bucket and path exist (create the bucket first)",
                "malformed": "check the URI and storage_options.client_kwargs.endpoint_url"}
    if where.startswith(("gs://", "gcs://")):
        creds = "set GOOGLE_APPLICATION_CREDENTIALS or use workload identity for this process"
        return {"credentials": creds, "access": "give this identity read/write access to the bucket",
                "missing": "check the bucket and path exist", "malformed": "check the URI and storage_options"}
    return {"credentials": "check the credentials of this filesystem", "access": "check the permissions of the path",
            "missing": "check the path exists", "malformed": "check the URI and storage_options"}


def classify(exc: BaseException, where: str = "") -> Permanent | None:
    """A :class:`Permanent` for errors that retrying cannot fix; None for transient ones."""
    fix = _fixes(where)
    for e in _chain(exc):
        names = {t.__name__ for t in type(e).__mro__}
        code, status = _client_error(e)
        if names & _TRANSIENT_ERRORS or code in _TRANSIENT_CODES or status == 429 or status >= 500:
            return None
        if names & _CREDENTIAL_ERRORS or code in _CREDENTIAL_CODES:
            return Permanent("no valid credentials", fix["credentials"])
        if code in _ACCESS_CODES or status == 403 or isinstance(e, PermissionError):
            return Permanent("access denied", fix["access"])
        # s3fs turns NoSuchBucket into FileNotFoundError("The specified bucket does not exist").
        if code in _MISSING_BUCKET_CODES or (isinstance(e, FileNotFoundError) and "bucket does not exist" in str(e)):
            return Permanent("the bucket does not exist", fix["missing"])
        if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
            return Permanent("not found", fix["missing"])
        if names & _MALFORMED_ERRORS or isinstance(e, (ValueError, TypeError)):
            return Permanent("malformed endpoint or URL", fix["malformed"])
        if isinstance(e, (TimeoutError, ConnectionError)):
            return None
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with 'equal jitter' (half fixed, half random), capped."""

    base_s: float = 1.0
    cap_s: float = 30.0

    def delay(self, attempt: int) -> float:
        d = min(self.cap_s, self.base_s * (2 ** min(attempt, 30)))
        return d / 2 + random.uniform(0, d / 2)


DEFAULT_POLICY = RetryPolicy()


class Attempts:
    """One retried operation. After each failed attempt call :meth:`failed`: it raises for a
    permanent error or past the deadline, else logs, sleeps the backoff and returns.

    ``deadline`` is a ``time.monotonic()`` value, None (no end), or a callable returning either
    (a periodic upload gets a deadline once the run's final save is submitted).
    """

    def __init__(self, where: str, action: str, *, deadline: float | None | Callable[[], float | None] = None,
                 policy: RetryPolicy = DEFAULT_POLICY, limit_s: float | None = None, hint: str = "",
                 on_failure: Callable[[BaseException, int, float], None] | None = None, started: float | None = None):
        self.where, self.action = where, action
        self._deadline = deadline
        self.policy = policy
        self.limit_s = limit_s
        self.hint = hint or "check the endpoint, bucket and credentials"
        self.on_failure = on_failure
        self.started = time.monotonic() if started is None else started  # for "failed for N s"
        self.attempt = 0

    def deadline(self) -> float | None:
        return self._deadline() if callable(self._deadline) else self._deadline

    def failed(self, exc: BaseException) -> None:
        if isinstance(exc, StorageError):
            raise exc
        perm = classify(exc, self.where)
        if perm is not None:
            raise StorageError(f"{self.where}: {self.action} failed: {perm.problem} ({one_line(exc)}); "
                               f"{perm.fix}") from exc
        delay = self.policy.delay(self.attempt)
        now, end = time.monotonic(), self.deadline()
        if end is not None and now + delay > end:
            limit = self.limit_s if self.limit_s is not None else end - self.started
            raise StorageError(f"{self.where}: {self.action} failed for {now - self.started:.0f} s "
                               f"(limit {limit:g} s): {one_line(exc)}; {self.hint}") from exc
        if self.on_failure is not None:
            self.on_failure(exc, self.attempt, delay)
        elif self.attempt == 0 or self.attempt % 10 == 0:
            log.warning("%s of %s failed (attempt %d: %s); retrying in %.1f s", self.action, self.where,
                        self.attempt + 1, one_line(exc), delay)
        self.attempt += 1
        time.sleep(delay)


def call(fn: Callable[[], T], where: str, action: str, **kw: Any) -> T:
    """``fn()``, retried per the policy (keyword arguments as for :class:`Attempts`)."""
    attempts = Attempts(where, action, **kw)
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified: permanent raises at once, transient retries
            attempts.failed(exc)
