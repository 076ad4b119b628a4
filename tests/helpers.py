"""Small assertions and queries shared by the DAG tests."""

from __future__ import annotations

import os
from pathlib import Path

from psycopg import sql

from bq_backfill.model_file import get_declaration
from bq_backfill.models import Column
from devtools.seed import SEED_TENANT

ROOT = Path(__file__).resolve().parents[1]
# the role runs connect as in the least-privilege tests: roles are the server's, so one of this session's own
# (conftest allows the setup DAG to grant it)
WRITER_ROLE = f"backfill_writer_{os.getpid()}"


# the inventory model as a run resolves it against the table setup creates (conftest's pg fixture)
INVENTORY = get_declaration("inventory").resolved(
    tuple(
        Column(name, pg_type)
        for name, pg_type in (
            ("tenant_id", "uuid"),
            ("movement_date", "date"),
            ("branch_id", "text"),
            ("product_code", "text"),
            ("quantity", "numeric(18,4)"),
            ("unit_cost", "numeric(18,4)"),
            ("movement_type", "text"),
            ("updated_at", "timestamp with time zone"),
        )
    )
)


def conf(**overrides) -> dict:
    return {"tenant_id": SEED_TENANT, "model_type": "inventory", "chunk_size": 250, **overrides}


def jobs(conn, tenant_id: str = SEED_TENANT, model_type: str = "inventory") -> list[dict]:
    cur = conn.execute(
        "SELECT id::text, status, total_records, processed_records, rejected_records, error_message, dag_run_id "
        "FROM bigquery_backfill_jobs WHERE tenant_id = %s AND model_type = %s ORDER BY created_at",
        (tenant_id, model_type),
    )
    names = [d.name for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def chunks(conn, job_id: str) -> list[dict]:
    cur = conn.execute(
        "SELECT chunk_index, start_offset, end_offset, status, rows_read, rows_inserted, rows_updated, rows_unchanged, "
        "rows_duplicate, rows_rejected, write_path, completed_at, key_proof "
        "FROM backfill_chunks WHERE job_id = %s ORDER BY chunk_index",
        (job_id,),
    )
    names = [d.name for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def table_state(conn, table: str, where: str = "TRUE", params: tuple = ()) -> list[tuple]:
    """Every row of a table (optionally filtered) with its xmin, so 'unchanged' means not rewritten either."""
    return conn.execute(
        f"SELECT xmin::text, t.* FROM {table} t WHERE {where} ORDER BY 2, 3, 4",  # noqa: S608 - test-only, fixed names
        params,
    ).fetchall()


def ti_states(dr) -> dict[tuple[str, int], str]:
    return {(ti.task_id, ti.map_index): ti.state for ti in dr.get_task_instances()}


def scratch_tables(bq, dataset: str = "backfill_scratch") -> list[str]:
    if not any(d.dataset_id == dataset for d in bq.list_datasets()):
        return []
    return [t.table_id for t in bq.list_tables(dataset)]


def stall_first_write(pg, product_code: str, seconds: int) -> None:
    """The first write of one product sleeps inside its chunk's transaction; later attempts pass (a sequence is
    not rolled back with the transaction)."""
    pg.execute("CREATE SEQUENCE stall_attempts")
    pg.execute(
        """
        CREATE FUNCTION stall_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.product_code = TG_ARGV[0] AND nextval('stall_attempts') = 1 THEN
                PERFORM pg_sleep(TG_ARGV[1]::int);
            END IF;
            RETURN NEW;
        END $$;
        """
    )
    pg.execute(
        sql.SQL(
            "CREATE TRIGGER stall_once BEFORE INSERT ON inventory_movements "
            "FOR EACH ROW EXECUTE FUNCTION stall_once({}, {})"
        ).format(sql.Literal(product_code), sql.Literal(str(seconds)))
    )


def wait_for_stalled_chunk(conn, timeout: float = 120) -> tuple[int, str] | None:
    """(backend pid, application_name) of a chunk session sleeping in stall_first_write's trigger, once one is."""
    return wait_for_chunk_session(conn, "wait_event = 'PgSleep'", timeout)


def wait_for_chunk_session(conn, condition: str, timeout: float, poll: float = 0.02) -> tuple[int, str] | None:
    """(backend pid, application_name) of a chunk session in pg_stat_activity matching `condition`, once one does."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute(
            f"SELECT pid, application_name FROM pg_stat_activity WHERE {condition} "  # noqa: S608 - test-only
            "AND application_name LIKE 'bigquery_backfill chunk %%'"
        ).fetchone()
        if row:
            return row
        time.sleep(poll)
    return None
