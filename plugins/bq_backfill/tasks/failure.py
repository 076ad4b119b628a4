"""Every task's failure callback: the job row says failed, with the error, instead of staying `running`."""

from __future__ import annotations

import logging

from bq_backfill import ledger
from bq_backfill.connections import postgres
from bq_backfill.errors import FleetIncompleteError, PartsFailedError, UpstreamNotDoneError
from bq_backfill.ledger import RunKey
from bq_backfill.settings import Settings

log = logging.getLogger(__name__)


def mark_job_failed(
    s: Settings, run: RunKey, task_label: str, error: BaseException | None, chunk_index: int = -1
) -> None:
    message = f"{task_label} failed: {error}" if error else f"{task_label} failed"
    # the task may have raised it wrapped (AirflowFailException: fail without a retry)
    kept = (UpstreamNotDoneError, FleetIncompleteError, PartsFailedError)
    if isinstance(error, kept) or isinstance(getattr(error, "__cause__", None), kept):
        log.error("%s; each job keeps its own error", message)
        return
    try:
        with postgres(s.postgres_conn_id) as conn:
            ledger.fail_job(conn, run, message, chunk_index)
    except Exception as exc:  # e.g. the very connection that failed: the task's own error says it all
        log.error("%s; the job row could not be marked failed either: %s", message, exc)
        return
    log.error("backfill job for run %s marked failed: %s", run.run_id, message)
