"""The run's settings: the DAG's Params, validated, as the tasks use them; and the deployment's allowlists.

Who can trigger a run must not decide where data is read from or written to: the connection ids, the source
table and the scratch dataset a run may name are set by the deployment, in Airflow's configuration section
`[bigquery_backfill]` (or `AIRFLOW__BIGQUERY_BACKFILL__*` environment variables), as comma-separated lists. The DAG
offers only those (Param `enum`, so the trigger form and the REST API refuse anything else before a run exists),
and every task checks them again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from bq_backfill.models import Declaration

CONFIG_SECTION = "bigquery_backfill"
# The Airflow pool bounding the chunks that write to Postgres at once; the deployment creates it (README "Deploy").
POOL = "bigquery_backfill_postgres"
# How old a run's snapshot may be when the run is resumed (the Param max_snapshot_age_hours, its default)
MAX_SNAPSHOT_AGE_HOURS = 24
# Param -> (configuration option, what is allowed when the option is not set)
ALLOWLISTS = {
    "gcp_conn_id": ("allowed_gcp_conn_ids", "google_cloud_default"),
    "postgres_conn_id": ("allowed_postgres_conn_ids", "postgres_default"),
    "scratch_dataset": ("allowed_scratch_datasets", "backfill_scratch"),
    "source_table": ("allowed_source_tables", ""),  # beyond the declared models' own tables (Param left empty)
}
# The setup DAG's connection: a role that may change the schema, which backfill runs must not be able to name.
SETUP_CONN_OPTION = ("allowed_setup_postgres_conn_ids", "postgres_default")
# The roles the setup DAG may grant a run's privileges to (after revoking what they held): none unless configured.
WRITER_ROLES_OPTION = "allowed_writer_roles"
NUMERIC_ROUNDING = ("reject", "round")
# a tenant id: a uuid, in either letter case
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
# the most tenants one run backfills ([bigquery_backfill] max_fleet_tenants), unless the deployment sets another
MAX_FLEET_TENANTS = 10_000


def allowed(param: str) -> list[str]:
    """The values the deployment allows for a Param, in the order configured."""
    from airflow.configuration import conf

    option, default = SETUP_CONN_OPTION if param == "setup_postgres_conn_id" else ALLOWLISTS[param]
    return _listed(conf.get(CONFIG_SECTION, option, fallback=default) or default)  # never an empty list


def _listed(raw: str) -> list[str]:
    """A comma-separated option's values, in the order configured, each once."""
    return list(dict.fromkeys(v.strip() for v in raw.split(",") if v.strip()))


NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,249}$"  # a connection id


def allowed_writer_roles() -> list[str]:
    """The roles the setup DAG may grant to ([bigquery_backfill] allowed_writer_roles; unset: none)."""
    from airflow.configuration import conf

    return _listed(conf.get(CONFIG_SECTION, WRITER_ROLES_OPTION, fallback="") or "")


def check_writer_role(role: str) -> None:
    if role not in allowed_writer_roles():
        raise PermissionError(
            f"writer_role {role!r} is not allowed by this deployment: setup revokes everything a writer role held "
            f"on the tables, then grants it a run's privileges, so only roles named in [{CONFIG_SECTION}] "
            f"{WRITER_ROLES_OPTION} (AIRFLOW__{CONFIG_SECTION.upper()}__{WRITER_ROLES_OPTION.upper()}) can be given"
        )


def allowlisted_param(param: str, preferred: str, pattern: str = NAME_PATTERN, description: str = "") -> Any:
    """A DAG Param offering only what the deployment allows ([bigquery_backfill] allowed_*): the trigger form shows
    a drop-down, the REST API refuses anything else before a run exists. Defaults to `preferred` if allowed."""
    from airflow.sdk import Param

    values = allowed(param)
    default = preferred if preferred in values else values[0]
    text = f"{description} One of: {', '.join(values)}.".strip()
    return Param(default, type="string", pattern=pattern, enum=values, description=text)


def check_allowed(param: str, value: str | None) -> None:
    if value is None and param == "source_table":
        return  # the model's registered table
    if value not in allowed(param):
        option = ALLOWLISTS[param][0]
        raise PermissionError(
            f"{param} {value!r} is not allowed by this deployment: add it to [{CONFIG_SECTION}] {option} "
            f"(AIRFLOW__{CONFIG_SECTION.upper()}__{option.upper()}) to allow it"
        )


def max_fleet_tenants() -> int:
    """The most tenants one run may backfill ([bigquery_backfill] max_fleet_tenants; unset: MAX_FLEET_TENANTS)."""
    from airflow.configuration import conf

    value = int(conf.get(CONFIG_SECTION, "max_fleet_tenants", fallback="") or MAX_FLEET_TENANTS)
    if value < 1:
        raise ValueError(f"[{CONFIG_SECTION}] max_fleet_tenants must be at least 1, not {value}")
    return value


class FleetConfError(ValueError):
    """The conf names no tenant, or names them in two ways, or repeats one."""


def fleet_tenants(params: dict[str, Any]) -> tuple[tuple[str, ...], bool, tuple[str, ...]]:
    """(the tenants named, in lower case; whether every tenant of the source is asked for; those left out of it)
    from the conf's tenant_id, tenant_ids, all_tenants and exclude_tenant_ids, each uuid checked again (a run created
    under an older DAG file must not outlive it)."""
    import re

    single = params.get("tenant_id") or None
    listed = list(params.get("tenant_ids") or [])
    every = bool(params.get("all_tenants", False))
    excluded = list(params.get("exclude_tenant_ids") or [])
    named = [single] if single else []
    named += listed
    if every and named:
        raise FleetConfError("give either all_tenants or tenant_id / tenant_ids, not both")
    if not every and not named:
        raise FleetConfError("no tenant given: set tenant_id, tenant_ids (a list) or all_tenants=true")
    if excluded and not every:
        raise FleetConfError("exclude_tenant_ids only applies with all_tenants=true")
    for value in (*named, *excluded):
        if not isinstance(value, str) or not re.match(UUID_PATTERN, value):
            raise FleetConfError(
                f"tenant {value!r} is not a uuid (36 characters, e.g. aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee)"
            )
    tenants = [t.lower() for t in named]
    repeated = sorted({t for t in tenants if tenants.count(t) > 1})
    if repeated:
        raise FleetConfError(f"tenant(s) given twice: {', '.join(repeated)} (a uuid is the same in either letter case)")
    limit = max_fleet_tenants()
    if len(tenants) > limit:
        raise FleetConfError(
            f"{len(tenants)} tenants, over this deployment's [{CONFIG_SECTION}] max_fleet_tenants ({limit}): split the "
            "list into several runs"
        )
    return tuple(tenants), every, tuple(dict.fromkeys(t.lower() for t in excluded))


def default_bytes_cap() -> int | None:
    """The deployment's default for the Param maximum_bytes_billed ([bigquery_backfill] maximum_bytes_billed; unset:
    no cap)."""
    from airflow.configuration import conf

    return _optional_int(conf.get(CONFIG_SECTION, "maximum_bytes_billed", fallback="") or None)


def _optional_int(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


@dataclass(frozen=True)
class Settings:
    """The run's conf, already validated by the DAG's Params. A run backfills a fleet of tenants (one tenant is a
    fleet of one): `tenant_ids` as named, or every tenant of the source but `exclude_tenant_ids` (`all_tenants`).
    `tenant_id` is set only on the per-tenant view a task works with (for_tenant)."""

    tenant_ids: tuple[str, ...]
    model_type: str
    chunk_size: int
    dry_run: bool
    max_rejected_rows: int
    source_table: str | None
    scratch_dataset: str
    gcp_conn_id: str
    postgres_conn_id: str
    allow_empty_source: bool = False
    numeric_rounding: str = "reject"
    delete_missing: bool = False
    max_deleted_rows: int = 0
    maximum_bytes_billed: int | None = None  # None: no cap
    max_snapshot_age_hours: int = MAX_SNAPSHOT_AGE_HOURS
    all_tenants: bool = False
    exclude_tenant_ids: tuple[str, ...] = ()
    tenant_id: str = ""

    def for_tenant(self, tenant_id: str) -> Settings:
        """These settings for one tenant of the fleet."""
        return replace(self, tenant_id=tenant_id.lower())

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Settings:
        tenants, every, excluded = fleet_tenants(params)
        settings = cls(
            tenant_ids=tenants,
            all_tenants=every,
            exclude_tenant_ids=excluded,
            model_type=params["model_type"],
            chunk_size=int(params["chunk_size"]),
            dry_run=bool(params["dry_run"]),
            max_rejected_rows=int(params["max_rejected_rows"]),
            source_table=params.get("source_table") or None,
            scratch_dataset=params["scratch_dataset"],
            gcp_conn_id=params["gcp_conn_id"],
            postgres_conn_id=params["postgres_conn_id"],
            allow_empty_source=bool(params.get("allow_empty_source", False)),
            numeric_rounding=params.get("numeric_rounding", "reject"),
            delete_missing=bool(params.get("delete_missing", False)),
            max_deleted_rows=int(params.get("max_deleted_rows", 0)),
            maximum_bytes_billed=_optional_int(params.get("maximum_bytes_billed")),
            max_snapshot_age_hours=int(params.get("max_snapshot_age_hours", MAX_SNAPSHOT_AGE_HOURS)),
        )
        # Again here, not only in the Params: a run created under an older configuration must not outlive it.
        for param in ALLOWLISTS:
            check_allowed(param, getattr(settings, param))
        if settings.numeric_rounding not in NUMERIC_ROUNDING:
            raise ValueError(f"numeric_rounding must be one of {NUMERIC_ROUNDING}, not {settings.numeric_rounding!r}")
        return settings

    @property
    def declaration(self) -> Declaration:
        from bq_backfill.model_file import get_declaration

        return get_declaration(self.model_type)
