"""Drive an existing dag run in-process, the way `dag.test()` does, after clearing some of its tasks.

`dag.test()` always clears every task of the run it (re)uses; resuming after "clear the failed task with
downstream" needs the same clear the REST API / UI performs (airflow's own find_relevant_relatives, dag.clear,
clear_task_instances) and then dag.test's scheduling loop without its initial clear.
"""

from __future__ import annotations

from sqlalchemy import select


def _scheduler_dag(dag):
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))


def clear_with_downstream(dag, run_id: str, task_markers: list, *, only_failed: bool = True) -> list[tuple[str, int]]:
    """What POST .../clearTaskInstances {include_downstream: true, only_failed} does. Returns the cleared TIs."""
    from airflow import settings
    from airflow.models.taskinstance import clear_task_instances, find_relevant_relatives

    sdag = _scheduler_dag(dag)
    normal = {t for t in task_markers if not isinstance(t, tuple)}
    mapped = {t for t in task_markers if isinstance(t, tuple)}
    with settings.Session() as session:
        relatives = find_relevant_relatives(
            normal, mapped, direction="downstream", dag=sdag, run_id=run_id, session=session
        )
        normal.update(t for t in relatives if not isinstance(t, tuple))
        mapped.update(t for t in relatives if isinstance(t, tuple))
        markers = [*normal, *((t, m) for t, m in mapped if t not in normal)]
        tis = sdag.clear(dry_run=True, task_ids=markers, run_id=run_id, session=session, only_failed=only_failed)
        cleared = sorted((ti.task_id, ti.map_index) for ti in tis)
        clear_task_instances(list(tis), session, False)
        session.commit()
    return cleared


def drive(dag, run_id: str):
    """Runs the run's schedulable tasks until it finishes (dag.test's loop); returns the DagRun."""
    from airflow import settings
    from airflow.models.dagrun import DagRun
    from airflow.sdk import DagRunState, timezone
    from airflow.sdk.definitions.dag import _run_task
    from airflow.utils.state import TaskInstanceState

    sdag = _scheduler_dag(dag)
    session = settings.Session()
    dr = session.scalar(select(DagRun).where(DagRun.dag_id == dag.dag_id, DagRun.run_id == run_id))
    dr.dag = sdag
    dr.state = DagRunState.RUNNING
    session.commit()
    for _ in range(10_000):
        if dr.state != DagRunState.RUNNING:
            break
        session.expire_all()
        schedulable, _ = dr.update_state(session=session)
        for ti in schedulable:
            ti.try_number += 1
            ti.state = TaskInstanceState.SCHEDULED
            ti.scheduled_dttm = timezone.utcnow()
        session.commit()
        for ti in [t for t in dr.get_task_instances(session=session) if t.state == TaskInstanceState.SCHEDULED]:
            _run_task(ti=ti, task=dag.task_dict[ti.task_id])
    session.close()
    return dr
