"""Exit codes of every hala command and stage, and the exceptions that carry them.

The codes are a contract with the runners: Kubernetes fails an index at once on 2 and 3 (retrying a
wrong config or bad input does not help) and retries 75 (a temporary failure, worth a retry).
"""

import errno

EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected error: a bug; the traceback is logged
EXIT_CONFIG = 2  # usage or config error
EXIT_DATA = 3  # bad input data, a tampered artifact, a failed quality check (permanent)
EXIT_TEMPORARY = 75  # EX_TEMPFAIL: out of memory, a dead worker, a store that did not answer


class HalaError(Exception):
    """An error with a message meant for the user; `exit_code` says how the process ends."""

    exit_code = EXIT_FAILURE


class ConfigError(HalaError):
    exit_code = EXIT_CONFIG


class DataError(HalaError):
    exit_code = EXIT_DATA


class TemporaryError(HalaError):
    exit_code = EXIT_TEMPORARY


# What an object store's client raises once its own retries are spent: the store or the network did not answer
# (botocore and aiohttp name their connection and timeout errors so; s3fs turns a 5xx into OSError EREMOTEIO,
# a 503 SlowDown into EBUSY; a soft-mounted NFS server that stopped answering is EIO)
_TEMPORARY_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientPayloadError",
        "ServerTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
    }
)
_TEMPORARY_ERRNOS = frozenset(
    {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.EIO, getattr(errno, "EREMOTEIO", errno.EIO)}
)
# gcsfs's HttpError codes worth a retry once its own retries are spent: 5xx, 408 Request Timeout, 429 Too Many
# Requests
_TEMPORARY_HTTP = frozenset({408, 429})


def exit_code_for(exc: BaseException) -> int:
    """Map any exception to the exit code a runner should see."""
    if isinstance(exc, HalaError):
        return exc.exit_code
    # Refused: s3fs turns AccessDenied into PermissionError, gcsfs a 403 into OSError("Forbidden: ..."); a
    # local store the process may not write. Retrying does not help; the credentials or the permissions must
    # change.
    if isinstance(exc, PermissionError) or (type(exc) is OSError and str(exc).startswith("Forbidden")):
        return EXIT_CONFIG
    # The network or the store not answering is worth a retry; anything else unexpected is a bug.
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return EXIT_TEMPORARY
    if any(cls.__name__ in _TEMPORARY_NAMES for cls in type(exc).__mro__):
        return EXIT_TEMPORARY
    if isinstance(exc, OSError) and exc.errno in _TEMPORARY_ERRNOS:
        return EXIT_TEMPORARY
    code = getattr(exc, "code", None)  # gcsfs's HttpError after its retries
    if (
        type(exc).__name__ == "HttpError"
        and isinstance(code, int)
        and (code >= 500 or code in _TEMPORARY_HTTP)
    ):
        return EXIT_TEMPORARY
    if isinstance(exc, MemoryError):
        return EXIT_TEMPORARY
    return EXIT_FAILURE
