"""What a failure means for the task that meets it: retried with backoff, or failed at once."""

from __future__ import annotations

import psycopg


class PermanentChunkError(Exception):
    """An error that a retry cannot fix (bad data, a constraint, a trigger): fail now, clear when fixed."""


class PartsFailedError(PermanentChunkError):
    """Some tenants' parts of a chunk did not land, the others did; each failed part's job holds its own error,
    which this summary must not replace."""


class SourceReadError(Exception):
    """Reading a chunk from BigQuery failed; transient or not as its cause is."""


def is_transient(exc: BaseException) -> bool:
    """Errors worth a retry with backoff: the network, a restarted or overloaded server, a timeout.
    Anything else (bad data, a bug, a refused statement) fails at once; a retry would only repeat it."""
    import grpc
    from google.api_core import exceptions as gexc

    transient = (
        psycopg.OperationalError,
        ConnectionError,
        TimeoutError,
        gexc.ServerError,
        gexc.TooManyRequests,
        gexc.RetryError,
        gexc.DeadlineExceeded,
        grpc.RpcError,
    )
    if isinstance(exc, SourceReadError) and exc.__cause__ is not None:
        return is_transient(exc.__cause__)
    if isinstance(exc, gexc.Forbidden):  # BigQuery's 403 is both "not allowed" and "too often": its reason tells
        from bq_backfill.source import RETRIED_REASONS, error_reason

        return error_reason(exc) in RETRIED_REASONS
    return isinstance(exc, transient)


class ReconciliationError(Exception):
    """The run's counts or keys do not add up: the job is not completed."""


class FleetIncompleteError(ReconciliationError):
    """Some tenants of the run did not complete; each one's job holds its own error, which this summary must not
    replace."""


class EmptySourceError(ValueError):
    """The snapshot holds no row of the tenant (a mistyped tenant, or the wrong source table)."""


class BytesCapError(ValueError):
    """BigQuery's estimate of the snapshot query is over the run's maximum_bytes_billed: refused before billing."""


class UpstreamNotDoneError(ReconciliationError):
    """finalize found cleanup or plan not done: that task's own failure is the one to record."""
