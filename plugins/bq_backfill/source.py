"""BigQuery side: one frozen, numbered snapshot of a tenant's rows per run, read back chunk by chunk.

The snapshot is a scratch table made once per run with CREATE TABLE ... AS SELECT over the source
`FOR SYSTEM_TIME AS OF` a timestamp fixed at plan time, numbering rows by the model's full order key
(`_row_offset` 0..N-1). A chunk is the row range [start, end) of that table, read with the Storage Read API:
it scans only the snapshot, so the source is scanned once per backfill whatever the chunk count, and an offset
means the same row on every retry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from airflow.providers.google.common.consts import CLIENT_INFO
from google.api_core.client_options import ClientOptions
from google.api_core.exceptions import (
    Conflict,
    Forbidden,
    InternalServerError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceUnavailable,
)
from google.api_core.retry import Retry, if_exception_type
from google.auth.credentials import Credentials
from google.cloud import bigquery
from google.cloud.bigquery_storage_v1 import BigQueryReadClient, types
from google.cloud.bigquery_storage_v1.services.big_query_read.transports import BigQueryReadGrpcTransport

from bq_backfill import type_map
from bq_backfill.models import LATEST_COLUMN, OFFSET_COLUMN, Model
from bq_backfill.settings import UUID_PATTERN

log = logging.getLogger(__name__)

# Connection extras that point the clients at other endpoints (a local emulator): the REST API base URL, and
# host:port of a plaintext Storage Read API. Without them the clients use Google's endpoints.
REST_ENDPOINT_EXTRA = "bigquery_endpoint"
STORAGE_ENDPOINT_EXTRA = "storage_read_endpoint"
# Bound the client libraries' own retries (the REST client retries 5xx for 10 minutes by default, Storage reads for
# a day): a blip is absorbed, an outage surfaces within BACKFILL_BIGQUERY_RETRY_SECONDS and Airflow's task
# retries, with backoff and a log line each, take over.
CLIENT_RETRY_SECONDS = float(os.environ.get("BACKFILL_BIGQUERY_RETRY_SECONDS", "30"))
FAST_RETRY = Retry(predicate=lambda exc: _retryable(exc), initial=1.0, maximum=10.0, timeout=CLIENT_RETRY_SECONDS)
CALL_TIMEOUT = 60.0
# A query job (the snapshot, counts) that runs longer is cancelled by BigQuery itself (jobTimeoutMs) and fails here.
JOB_TIMEOUT_SECONDS = float(os.environ.get("BACKFILL_BIGQUERY_JOB_TIMEOUT_SECONDS", "1800"))
READ_RETRY = Retry(
    predicate=if_exception_type(ServiceUnavailable, InternalServerError, ResourceExhausted),
    initial=0.2,
    maximum=5.0,
    timeout=CLIENT_RETRY_SECONDS,
)
_PROJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")
_NAME = re.compile(r"^[A-Za-z0-9_]{1,1024}$")
_UUID = re.compile(UUID_PATTERN)


@dataclass(frozen=True)
class TableRef:
    project: str
    dataset: str
    table: str

    def __post_init__(self) -> None:
        # Identifiers cannot be bound as query parameters: only plain names ever reach the SQL text.
        if not (_PROJECT.match(self.project) and _NAME.match(self.dataset) and _NAME.match(self.table)):
            raise ValueError(f"BigQuery table {self.project}.{self.dataset}.{self.table} is not a plain table name")

    @classmethod
    def parse(cls, name: str, default_project: str) -> TableRef:
        parts = name.split(".")
        if len(parts) == 2:
            return cls(default_project, parts[0], parts[1])
        if len(parts) == 3:
            return cls(*parts)
        raise ValueError(f"BigQuery table {name!r} is not 'dataset.table' or 'project.dataset.table'")

    def __str__(self) -> str:
        return f"{self.project}.{self.dataset}.{self.table}"

    @property
    def sql(self) -> str:
        return f"`{self.project}`.`{self.dataset}`.`{self.table}`"

    @property
    def storage_path(self) -> str:
        return f"projects/{self.project}/datasets/{self.dataset}/tables/{self.table}"


_LABEL = re.compile(r"[^a-z0-9_-]")


def job_labels(dag_id: str, model_type: str, tenants: Sequence[str], run_id: str) -> dict[str, str]:
    """Labels for a backfill's BigQuery jobs and snapshot table, so billing exports attribute its cost: the DAG, the
    model, a hash of the tenant (a fleet: `fleet-` and its size) and of the dag run (a label value must be at most 63
    lower-case letters, digits, '_' or '-'; a tenant id is not put in billing data as it is)."""

    def value(text: str) -> str:
        return _LABEL.sub("_", text.lower())[:63]

    return {
        "backfill_dag": value(dag_id),
        "backfill_model": value(model_type),
        "backfill_tenant": (
            hashlib.sha256(tenants[0].lower().encode()).hexdigest()[:16]
            if len(tenants) == 1
            else f"fleet-{len(tenants)}"
        ),
        "backfill_run": hashlib.sha256(f"{dag_id}\0{run_id}".encode()).hexdigest()[:16],
    }


# BigQuery: "Number of partitions modified by a single job: 4,000" (quotas page). The snapshot's CTAS writes one
# partition per chunk, so a run has at most this many chunks.
MAX_SNAPSHOT_PARTITIONS = 4_000


class BigQueryPermissionError(PermissionError):
    """BigQuery refused a call for want of a permission (accessDenied / PERMISSION_DENIED): a retry cannot help."""


class SourceNotTableError(ValueError):
    """The source is a view or another kind of table that time travel (FOR SYSTEM_TIME AS OF) cannot read."""


# Reasons of a 403 that mean "later", not "never": retried by the client with backoff (bounded), then by Airflow.
RETRIED_REASONS = frozenset({"rateLimitExceeded", "quotaExceeded", "backendError", "internalError", "badGateway"})


def error_reason(exc: BaseException) -> str | None:
    """The `reason` BigQuery's REST API puts in an error (accessDenied, rateLimitExceeded, quotaExceeded, …)."""
    errors = getattr(exc, "errors", None) or []
    first = errors[0] if errors else None
    return first.get("reason") if isinstance(first, dict) else None


def _retryable(exc: BaseException) -> bool:
    return bigquery.DEFAULT_RETRY._predicate(exc) or error_reason(exc) in RETRIED_REASONS


@contextmanager
def needs(step: str, permissions: str) -> Iterator[None]:
    """Turns BigQuery's refusal of `step` into an error naming the permissions that step needs (docs/bigquery.md:
    Permissions); a rate or quota refusal is left as it is, to be retried."""
    try:
        yield
    except Forbidden as exc:  # REST: 403 with a reason; gRPC: PERMISSION_DENIED (a subclass)
        if not isinstance(exc, PermissionDenied) and error_reason(exc) != "accessDenied":
            raise
        raise BigQueryPermissionError(
            f"BigQuery refused to {step}: {exc.message}. The connection's account needs {permissions}"
        ) from exc


class LocationMismatchError(ValueError):
    """The scratch dataset is not in the source dataset's location."""


def snapshot_name(model: Model, tenants: Sequence[str], dag_id: str, run_id: str) -> str:
    digest = hashlib.sha256(f"{dag_id}\0{run_id}".encode()).hexdigest()[:16]
    who = tenants[0].replace("-", "") if len(tenants) == 1 else f"fleet{len(tenants)}"
    return f"backfill_{model.model_type}_{who}_{digest}"


def _as_of_literal(ts: datetime) -> str:
    # BigQuery (and its emulator) accept FOR SYSTEM_TIME AS OF with a literal; the value is our own datetime,
    # rendered from a fixed format, never text from conf.
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")


class BigQuerySource:
    def __init__(self, client: bigquery.Client, read_client: BigQueryReadClient, project: str) -> None:
        self.client = client
        self.read_client = read_client
        self.project = project
        self.location: str | None = None  # the source dataset's, once locate() found it: every query job runs there
        self.labels: dict[str, str] = {}  # put on every query job and on the snapshot table (see job_labels)
        self.maximum_bytes_billed: int | None = None  # put on every query job: BigQuery fails one that would bill more

    @classmethod
    def from_connection(cls, gcp_conn_id: str) -> BigQuerySource:
        from airflow.providers.google.cloud.hooks.bigquery import BigQueryHook

        hook = BigQueryHook(gcp_conn_id=gcp_conn_id, use_legacy_sql=False)
        project = hook.project_id
        if not project:
            raise ValueError(f"connection {gcp_conn_id!r} names no project: set extra 'project'")
        extras = hook.get_connection(gcp_conn_id).extra_dejson
        credentials = hook.get_credentials()
        # What hook.get_client() builds, plus an endpoint when the connection names one.
        client = bigquery.Client(
            project=project,
            credentials=credentials,
            client_info=CLIENT_INFO,
            client_options=ClientOptions(api_endpoint=extras.get(REST_ENDPOINT_EXTRA) or None),
        )
        return cls(client, make_read_client(credentials, extras.get(STORAGE_ENDPOINT_EXTRA) or None), project)

    def table(self, name: str) -> TableRef:
        return TableRef.parse(name, self.project)

    def source_schema(self, source: TableRef) -> dict[str, str]:
        """The source table's columns and their types (standard SQL names, ARRAY<...> for a REPEATED one), after
        checking it is a table that exists: what a model is resolved against (models.resolve)."""
        try:
            with needs(f"read the metadata of {source}", f"bigquery.tables.get on {source}"):
                table = self.client.get_table(str(source), retry=FAST_RETRY, timeout=CALL_TIMEOUT)
        except NotFound as exc:
            raise LookupError(f"BigQuery source table {source} not found: {exc.message}") from exc
        if table.table_type != "TABLE":
            raise SourceNotTableError(
                f"BigQuery source {source} is a {table.table_type}, not a table: a backfill reads a snapshot with time "
                "travel (FOR SYSTEM_TIME AS OF), which only tables have. Point source_table at the table the "
                f"{table.table_type.lower()} reads (allowed by [bigquery_backfill] allowed_source_tables)"
            )
        return {f.name: self.column_type(f) for f in table.schema}

    @staticmethod
    def column_type(field: bigquery.SchemaField) -> str:
        """A source column's type in standard SQL names, ARRAY<...> for a REPEATED one."""
        element = getattr(field, "range_element_type", None)
        return type_map.bigquery_type(field.field_type, field.mode, element.element_type if element else None)

    def locate(self, source: TableRef, scratch_dataset: str, *, create: bool = True) -> str:
        """Finds the source dataset's location and makes sure the scratch dataset is there too (created there if
        missing, unless `create` is false: a dry run only checks one that exists): a query over the source can only
        write a table in its own location. From then on every query job of this client runs in that location. Runs
        no query."""
        source_dataset = f"{source.project}.{source.dataset}"
        with needs(f"read dataset {source_dataset}", f"bigquery.datasets.get on dataset {source_dataset}"):
            location = self.client.get_dataset(source_dataset, retry=FAST_RETRY).location or "US"
        scratch_needs = (
            f"bigquery.datasets.get on dataset {self.project}.{scratch_dataset}, and bigquery.datasets.create on "
            f"project {self.project} while that dataset does not exist"
        )
        wanted = bigquery.Dataset(f"{self.project}.{scratch_dataset}")
        wanted.location = location
        with needs(f"make or read the scratch dataset {self.project}.{scratch_dataset}", scratch_needs):
            try:  # looked up first: once it exists (every run but the first) that is one request, not two
                scratch = self.client.get_dataset(wanted.reference, retry=FAST_RETRY, timeout=CALL_TIMEOUT)
            except NotFound:
                scratch = wanted  # made in the source's location (a dry run only says it would be)
                if create:
                    scratch = self.client.create_dataset(wanted, exists_ok=True, retry=FAST_RETRY, timeout=CALL_TIMEOUT)
        if (scratch.location or "US").lower() != location.lower():
            raise LocationMismatchError(
                f"scratch dataset {self.project}.{scratch_dataset} is in {scratch.location}, the source {source} in "
                f"{location}: a query over {location} cannot write there. Set the Param scratch_dataset to a dataset "
                f"in {location} (allowed by [bigquery_backfill] allowed_scratch_datasets), or drop "
                f"{self.project}.{scratch_dataset} so that it is made again in {location}"
            )
        self.location = location
        return location

    def now(self) -> datetime:
        return self._scalar("SELECT CURRENT_TIMESTAMP()")

    def new_snapshot(
        self,
        model: Model,
        source: TableRef,
        bases: dict[str, int],
        snapshot: TableRef,
        as_of: datetime,
        chunk_size: int,
    ) -> dict[str, int]:
        """Creates the numbered snapshot as of `as_of` of the fleet's tenants (tenant -> its first offset, see
        snapshot_select), one partition per chunk of `chunk_size` offsets, replacing a table of that name; returns
        each tenant's row count in it."""
        self._create_snapshot(model, source, bases, snapshot, as_of, chunk_size, replace=True)
        log.info("snapshot %s created from %s as of %s", snapshot, source, as_of.isoformat())
        return self.snapshot_counts(model, snapshot)

    def keep_snapshot(
        self,
        model: Model,
        source: TableRef,
        bases: dict[str, int],
        snapshot: TableRef,
        as_of: datetime,
        chunk_size: int,
    ) -> dict[str, int]:
        """The run's recorded snapshot: kept if it exists, made again as of the same time if not (dropped by a
        completed run, or expired); returns each tenant's row count in it."""
        try:
            self._create_snapshot(model, source, bases, snapshot, as_of, chunk_size, replace=False)
            log.info("snapshot %s made again from %s as of %s", snapshot, source, as_of.isoformat())
        except Conflict:
            log.info("snapshot %s already exists (retried or cleared plan): reusing it", snapshot)
        return self.snapshot_counts(model, snapshot)

    def snapshot_counts(self, model: Model, snapshot: TableRef) -> dict[str, int]:
        """Rows per tenant (in lower case) in a snapshot: one query over its tenant column."""
        tenant = model.tenant_column
        query = f"SELECT LOWER(`{tenant}`) AS t, COUNT(*) AS n FROM {snapshot.sql} GROUP BY t"  # noqa: S608
        return {row[0]: int(row[1]) for row in self._run(query)}

    def snapshot_query(
        self,
        model: Model,
        source: TableRef,
        snapshot: TableRef,
        as_of: datetime,
        chunk_size: int,
        *,
        replace: bool = True,
    ) -> str:
        """The DDL that makes the snapshot from snapshot_select.

        Integer-range partitioned on _row_offset, one partition per chunk: a chunk's read session, restricted to its
        offsets, reads only its own partition, so a backfill reads the snapshot once in total, not once per read. A
        job may write at most MAX_SNAPSHOT_PARTITIONS partitions; offsets past them would land in one unpartitioned
        remainder, which plan refuses (check_chunk_count)."""
        size, end = int(chunk_size), int(chunk_size) * MAX_SNAPSHOT_PARTITIONS
        # Identifiers: validated TableRef and registry names; sizes are ints; label text is job_labels' own.
        return (
            f"CREATE {'OR REPLACE ' if replace else ''}TABLE {snapshot.sql} "
            f"PARTITION BY RANGE_BUCKET(`{OFFSET_COLUMN}`, GENERATE_ARRAY(0, {end}, {size})) "
            f"OPTIONS(expiration_timestamp=TIMESTAMP_ADD(CURRENT_TIMESTAMP(), INTERVAL 7 DAY)"
            f"{self._label_option()}) AS {self.snapshot_select(model, source, as_of)}"
        )

    @staticmethod
    def snapshot_select(model: Model, source: TableRef, as_of: datetime) -> str:
        """The fleet's rows (bound parameters, see fleet_params) as of `as_of`, one per conflict key, each tenant's
        numbered from its first offset (@fleet_bases, in the order of @fleet_tenants) by the model's full order key:
        the only query that reads the source table. Numbered per tenant (a window partitioned by the tenant), so no
        step sorts the whole fleet's rows at once; the first offsets come from the plan's count of each tenant's rows,
        so a tenant whose duplicate keys are left out leaves unused offsets at the end of its range.

        Rows sharing a conflict key are resolved here, where the whole tenant is seen, whatever order BigQuery reads
        them in: the latest by the order key is kept, a tie on the whole order key broken by the row's other values
        (the greatest kept). Rows with a NULL key column are all kept (each is quarantined)."""
        cols = ", ".join(
            f"{type_map.read_expression(c.source_type, c.pg_type, f'`{c.source}`')} AS `{c.name}`"
            for c in model.columns
        )
        order = ", ".join(f"`{model.source_name(c)}`" for c in model.order_key)
        read = {c.source: c.source_type for c in model.columns}
        sources = ", ".join(f"`{s}`" for s in read)
        values = f"TO_JSON_STRING(STRUCT({sources}))"
        key = [f"`{model.source_name(c)}`" for c in model.conflict_key]
        null_key = " OR ".join(f"{k} IS NULL" for k in key)
        # a tie on the whole order key: the greatest row by its other columns, as JSON text those that cannot be
        # ordered by or whose value an ordering may normalise (a float's -0)
        order_sources = {model.source_name(c) for c in model.order_key}
        direct = {s for s, t in read.items() if s not in order_sources and t in type_map.ORDERED}
        plain = [f"`{s}` DESC" for s in read if s in direct]
        other = [f"`{s}`" for s in read if s not in direct and s not in order_sources]
        ties = [*plain, *([f"TO_JSON_STRING(STRUCT({', '.join(other)})) DESC"] if other else [])]
        latest = ", ".join([*(f"`{model.source_name(c)}` DESC" for c in model.order_key), *ties])
        # Identifiers: validated TableRef and registry names. Values: @tenant_ids bound; AS OF is our own timestamp.
        tenant = f"LOWER(`{model.source_name(model.tenant_column)}`)"
        # a uuid is one tenant in either letter case: duplicates are found in the same way
        partition = ", ".join([tenant, *key[1:]])
        return (
            f"SELECT {cols}, _row_base + ROW_NUMBER() OVER (PARTITION BY {tenant} ORDER BY {order}) - 1 "  # noqa: S608
            f"AS `{OFFSET_COLUMN}` FROM ("
            f"SELECT {sources}, ROW_NUMBER() OVER (PARTITION BY {partition}, IF({null_key}, {values}, NULL) "
            f"ORDER BY {latest}) AS `{LATEST_COLUMN}` "
            f"FROM {source.sql} FOR SYSTEM_TIME AS OF TIMESTAMP '{_as_of_literal(as_of)}' "
            f"WHERE `{model.source_name(model.tenant_column)}` IN UNNEST(@tenant_ids)"
            f") JOIN UNNEST(@fleet_tenants) AS _row_tenant WITH OFFSET AS _row_i ON {tenant} = _row_tenant "
            f"JOIN UNNEST(@fleet_bases) AS _row_base WITH OFFSET AS _row_j ON _row_i = _row_j "
            f"WHERE `{LATEST_COLUMN}` = 1"
        )

    def count_tenant_rows(
        self, model: Model, source: TableRef, tenants: Sequence[str], as_of: datetime
    ) -> dict[str, int]:
        """Each tenant's rows in the source as of `as_of` (tenant in lower case -> rows; a tenant without rows is
        absent): the snapshot's size to be, billed on the tenant column alone, so a plan that cannot run is refused
        before the snapshot query bills every column."""
        column = model.source_name(model.tenant_column)
        query = (
            f"SELECT LOWER(`{column}`) AS t, COUNT(*) AS n FROM {source.sql} "  # noqa: S608 (identifiers validated)
            f"FOR SYSTEM_TIME AS OF TIMESTAMP '{_as_of_literal(as_of)}' "
            f"WHERE `{column}` IN UNNEST(@tenant_ids) GROUP BY t"
        )
        step = (f"count the tenants' rows in {source}", f"bigquery.jobs.create, bigquery.tables.getData on {source}")
        return {row[0]: int(row[1]) for row in self._run(query, tenant_param(tenants), step)}

    def list_tenants(self, model: Model, source: TableRef) -> list[str]:
        """Every tenant in the source now, in lower case, sorted (all_tenants): billed on the tenant column alone."""
        column = model.source_name(model.tenant_column)
        query = (
            f"SELECT DISTINCT LOWER(`{column}`) AS t FROM {source.sql} "  # noqa: S608 (identifiers validated)
            f"WHERE `{column}` IS NOT NULL ORDER BY t"
        )
        step = (f"list the tenants in {source}", f"bigquery.jobs.create, bigquery.tables.getData on {source}")
        return [row[0] for row in self._run(query, None, step)]

    def estimate_snapshot_bytes(self, model: Model, source: TableRef, tenants: Sequence[str]) -> int:
        """BigQuery's dry-run figure for the bytes the snapshot query reads from the source: what on-demand pricing
        bills (at least 10 MB per table). Asked for the query's read alone (the same columns of the same table, the
        same filter): BigQuery bills the columns a query reads, not what it computes from them, and the as-of time
        does not change which columns those are. A dry run is free, runs nothing and needs no scratch dataset."""
        config = tenant_param(tenants)
        config.dry_run = True
        config.use_query_cache = False
        cols = ", ".join(f"`{c.source}`" for c in model.columns)
        tenant = model.source_name(model.tenant_column)
        read = f"SELECT {cols} FROM {source.sql} WHERE `{tenant}` IN UNNEST(@tenant_ids)"  # noqa: S608
        job = self._query(read, config)
        return int(job.total_bytes_processed or 0)

    def _create_snapshot(
        self,
        model: Model,
        source: TableRef,
        bases: dict[str, int],
        snapshot: TableRef,
        as_of: datetime,
        chunk_size: int,
        *,
        replace: bool,
    ) -> None:
        query = self.snapshot_query(model, source, snapshot, as_of, chunk_size, replace=replace)
        permissions = (
            f"bigquery.jobs.create on project {self.project}, bigquery.tables.getData on {source}, and "
            f"bigquery.tables.create, bigquery.tables.updateData on dataset {snapshot.project}.{snapshot.dataset}"
        )
        self._run(query, fleet_params(bases), (f"make the snapshot {snapshot} from {source}", permissions))

    def _label_option(self) -> str:
        # label keys and values are job_labels' own: lower-case letters, digits, '_' and '-' only
        pairs = ", ".join(f'("{k}", "{v}")' for k, v in sorted(self.labels.items()))
        return f", labels=[{pairs}]" if pairs else ""

    def read_chunk(
        self, snapshot: TableRef, start: int, end: int, columns: list[str], streams: int = 1
    ) -> Iterator[pa.RecordBatch]:
        """The batches of rows start <= _row_offset < end, from one read session of up to `streams` streams read
        side by side, in whatever order BigQuery sends them. On the partitioned snapshot the restriction prunes the
        read to the chunk's own partition (see new_snapshot)."""
        restriction = f"`{OFFSET_COLUMN}` >= {int(start)} AND `{OFFSET_COLUMN}` < {int(end)}"
        schema, names = self._session(snapshot, restriction, columns, streams)
        if len(names) == 1:
            return self._stream(names[0], schema)
        return _merged([self._stream(name, schema) for name in names])

    def read_tenant_keys(self, model: Model, source: TableRef, tenant_ids: list[str]) -> Iterator[pa.RecordBatch]:
        """The tenant column (lower-cased) and key columns of the tenants' rows in the source as it is now, a batch at
        a time, with one read session (a dry run's look at what the target holds beyond the source). Bills the tenant
        and key columns of the source table."""
        for tenant_id in tenant_ids:
            if not _UUID.match(tenant_id):
                raise ValueError(f"tenant_id {tenant_id!r} is not a uuid")  # goes into the restriction's text
        forms = ", ".join(f'"{t}"' for t in dict.fromkeys(f for t in tenant_ids for f in (t.lower(), t.upper())))
        columns = [model.tenant_column, *model.conflict_key[1:]]
        restriction = f"`{model.source_name(model.tenant_column)}` IN ({forms})"
        # the session sends the selected fields in the table's order, not the order asked: named back by name
        names = {model.source_name(c): c for c in columns}
        _, batches = self._read(source, restriction, list(names))
        for batch in batches:
            named = batch.rename_columns([names[n] for n in batch.schema.names]).select(columns)
            yield named.set_column(0, model.tenant_column, pc.utf8_lower(named.column(0)))

    def _read(
        self, table: TableRef, restriction: str, columns: list[str]
    ) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        schema, names = self._session(table, restriction, columns, 1)
        return schema, (batch for name in names for batch in self._stream(name, schema))

    def _session(
        self, table: TableRef, restriction: str, columns: list[str], streams: int
    ) -> tuple[pa.Schema, list[str]]:
        permissions = f"bigquery.readsessions.create on project {self.project} and bigquery.tables.getData on {table}"
        with needs(f"open a read session on {table}", permissions):
            session = self.read_client.create_read_session(
                parent=f"projects/{self.project}",
                read_session=types.ReadSession(
                    table=table.storage_path,
                    data_format=types.DataFormat.ARROW,
                    read_options=types.ReadSession.TableReadOptions(
                        selected_fields=columns, row_restriction=restriction
                    ),
                ),
                max_stream_count=streams,
                retry=READ_RETRY,
                timeout=CALL_TIMEOUT,
            )
        schema = pa.ipc.read_schema(pa.py_buffer(session.arrow_schema.serialized_schema))
        return schema, [stream.name for stream in session.streams]

    def _stream(self, name: str, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        with needs("read a read session's stream", f"bigquery.readsessions.getData on project {self.project}"):
            for response in self.read_client.read_rows(name, retry=READ_RETRY, timeout=10 * CALL_TIMEOUT):
                batch = response.arrow_record_batch.serialized_record_batch
                yield pa.ipc.read_record_batch(pa.py_buffer(batch), schema)

    def drop_snapshot(self, snapshot: TableRef) -> None:
        with needs(f"drop {snapshot}", f"bigquery.tables.delete on dataset {snapshot.project}.{snapshot.dataset}"):
            self.client.delete_table(str(snapshot), not_found_ok=True, retry=FAST_RETRY, timeout=CALL_TIMEOUT)

    def _query(
        self, query: str, config: bigquery.QueryJobConfig | None = None, step: tuple[str, str] | None = None
    ) -> bigquery.QueryJob:
        """Starts a query job; `step` is (what it does, the permissions it needs) for an access-denied error."""
        config = config or bigquery.QueryJobConfig()
        config.job_timeout_ms = int(JOB_TIMEOUT_SECONDS * 1000)
        config.labels = dict(self.labels)
        if self.maximum_bytes_billed is not None:
            config.maximum_bytes_billed = self.maximum_bytes_billed
        with needs(*(step or self._job_step())):
            return self.client.query(query, job_config=config, retry=FAST_RETRY, location=self.location)

    def _job_step(self) -> tuple[str, str]:
        return "run a query job", f"bigquery.jobs.create on project {self.project}"

    def _run(
        self,
        query: str,
        config: bigquery.QueryJobConfig | None = None,
        step: tuple[str, str] | None = None,
        page_size: int | None = None,
    ) -> bigquery.table.RowIterator:
        job = self._query(query, config, step)
        with needs(*(step or self._job_step())):
            return job.result(retry=FAST_RETRY, timeout=JOB_TIMEOUT_SECONDS + CALL_TIMEOUT, page_size=page_size)

    def _scalar(
        self, query: str, config: bigquery.QueryJobConfig | None = None, step: tuple[str, str] | None = None
    ) -> Any:
        # a page size makes the call that waits for the job bring its one row too: one round trip less
        return next(iter(self._run(query, config, step, page_size=1)))[0]


def tenant_param(tenants: Sequence[str]) -> bigquery.QueryJobConfig:
    return bigquery.QueryJobConfig(query_parameters=[_tenant_forms(tenants)])


def _tenant_forms(tenants: Sequence[str]) -> bigquery.ArrayQueryParameter:
    # A uuid is the same tenant in either letter case (Postgres's uuid type agrees); sources store one or the
    # other. Equality on the column itself (no LOWER()) keeps a clustered source's blocks pruned.
    forms = list(dict.fromkeys(f for t in tenants for f in (t.lower(), t.upper())))
    return bigquery.ArrayQueryParameter("tenant_ids", "STRING", forms)


def fleet_params(bases: dict[str, int]) -> bigquery.QueryJobConfig:
    """@tenant_ids (both letter cases of each), and each tenant's first offset: @fleet_bases[i] for @fleet_tenants[i]
    (two arrays of scalars: the emulator binds no array of STRUCTs)."""
    tenants = sorted(bases)
    return bigquery.QueryJobConfig(
        query_parameters=[
            _tenant_forms(tenants),
            bigquery.ArrayQueryParameter("fleet_tenants", "STRING", tenants),
            bigquery.ArrayQueryParameter("fleet_bases", "INT64", [bases[t] for t in tenants]),
        ]
    )


def _merged(streams: list[Iterator[pa.RecordBatch]]) -> Iterator[pa.RecordBatch]:
    """Batches of several streams, each read by a thread of its own, in the order they arrive. A bounded queue keeps
    readers at most a few batches ahead of the consumer; they stop when the consumer does."""
    done = object()
    out: queue.Queue[Any] = queue.Queue(maxsize=2 * len(streams))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def pump(stream: Iterator[pa.RecordBatch]) -> None:
        try:
            for batch in stream:
                if not put(batch):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    threads = [threading.Thread(target=pump, args=(s,), daemon=True, name="bq-stream") for s in streams]
    for t in threads:
        t.start()
    try:
        finished = 0
        while finished < len(streams):
            item = out.get()
            if item is done:
                finished += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()


def make_read_client(credentials: Credentials, plaintext_endpoint: str | None) -> BigQueryReadClient:
    """Storage Read client; a plaintext host:port (an emulator) needs a channel of its own, as google's own
    clients build for their *_EMULATOR_HOST settings."""
    if plaintext_endpoint:
        import grpc

        # The default transport lifts gRPC's 4 MiB receive limit; a hand-made channel must do the same.
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        channel = grpc.insecure_channel(plaintext_endpoint, options=options)
        return BigQueryReadClient(transport=BigQueryReadGrpcTransport(channel=channel))
    return BigQueryReadClient(credentials=credentials)
