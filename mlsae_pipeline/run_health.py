"""Runs whose process died stay STARTED in Dagster's records; mark them failed.

Dagster's run monitoring cannot check the default run launcher's workers nor in-process runs
(`mlsae sweep`), so a run killed mid-step would show as running forever. A run's process is
known: the pid and host tags `mlsae sweep` adds, else the pid of the process that logged the
run's RUN_START event (the run worker `dagster dev` launched on this machine).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import dagster as dg


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_process(instance: dg.DagsterInstance, run: dg.DagsterRun) -> tuple[int, str] | None:
    """(pid, host) of the process executing `run`, where it can be known."""
    if run.tags.get("mlsae/pid"):
        return int(run.tags["mlsae/pid"]), run.tags.get("mlsae/host", "")
    records = instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.RUN_START, limit=1
    ).records
    event = records[0].event_log_entry.dagster_event if records else None
    if event is None or event.pid is None:
        return None
    return int(event.pid), socket.gethostname()  # a local instance's run worker


def fail_dead_runs(instance: dg.DagsterInstance, report: Callable[[str], Any] = print) -> list:
    """Mark failed every STARTED run whose process on this host is gone; returns their ids."""
    host, failed = socket.gethostname(), []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        proc = run_process(instance, run)
        if proc is None or proc[1] != host or _alive(proc[0]):
            continue
        instance.report_run_failed(run, f"its process (pid {proc[0]} on {host}) is gone")
        failed.append(run.run_id)
    if failed:
        report(f"marked {len(failed)} run(s) whose process died as failed: {', '.join(failed)}")
    return failed


@dg.sensor(
    name="dead_run_monitor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Every 30 s: runs still STARTED whose process died (killed mid-step) are marked "
        "failed, so the Runs page tells the truth (Dagster's run monitoring cannot check "
        "these runs)."
    ),
)
def dead_run_monitor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    failed = fail_dead_runs(context.instance, report=context.log.info)
    return dg.SkipReason(f"marked {len(failed)} dead run(s) failed" if failed else "no dead runs")
