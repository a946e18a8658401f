"""The `runner` command: parse, call `runner.api`, render, map errors to exit codes.

\b
Exit codes a scheduler can act on:
  0    every row done
  3    finished, with failed, rejected or deferred rows
  2    bad config or input, or unusable state (nothing was sent)
  4    the run is already running in another process
  130  interrupted (resumable with `runner resume RUN`)
"""

from __future__ import annotations

import csv
import functools
import json
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import click

from runner import api, eventloop, gc_settings, logs, reports
from runner.config import load_job
from runner.errors import RunLocked, RunnerError
from runner.pricing import micros_to_usd
from runner.progress import ProgressDisplay, print_table, rows_table, summary_table
from runner.records import Status
from runner.simulator import SimulatorConfig, serve
from runner.store import Store, TenantCounts

EXIT_OK, EXIT_UNFINISHED, EXIT_BAD_INPUT, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 3, 2, 4, 130
F = TypeVar("F", bound=Callable[..., Any])

_state_option = click.option(
    "--state",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="State database (default: $RUNNER_STATE, else ./runner.db).",
)


def _exits(command: F) -> F:
    """Turn our errors into a one-line message and exit code 2, Ctrl-C into 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logs.configure(_log_format())
        try:
            return command(*args, **kwargs)
        except RunLocked as error:
            _report_error(error)
            sys.exit(EXIT_LOCKED)
        except RunnerError as error:
            _report_error(error)
            sys.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper  # type: ignore[return-value]


@click.group(epilog=(__doc__ or "").split("\n\n", 1)[1])
@click.version_option(package_name="runner")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON object per line on stderr (progress, alerts, stops), and the "
    "result of submit/resume as one JSON object on stdout.",
)
@click.pass_context
def main(ctx: click.Context, log_format: str) -> None:
    """Multi-tenant batch inference against OpenAI-compatible endpoints."""
    ctx.obj = {"log_format": log_format}
    gc_settings.tune_for_throughput()


def _report_error(error: RunnerError) -> None:
    if _log_format() == "json":
        logs.log.error(str(error), extra={"event": "error"})
        click.echo(json.dumps({"event": "error", "message": str(error)}))
    else:
        click.echo(f"error: {error}", err=True)


def _log_format() -> logs.LogFormat:
    context = click.get_current_context(silent=True)
    root = context.find_root() if context else None
    return "json" if root and root.obj and root.obj.get("log_format") == "json" else "text"


_retry_failed_option = click.option(
    "--retry-failed", is_flag=True, help="Send failed rows again too (deferred ones always are)."
)


@main.command()
@click.argument("job", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--run-id", help="Run id or template (default: the job's run_id, else {job}-{input_hash})."
)
@click.option("--strict", is_flag=True, help="Refuse the whole file if any row is rejected.")
@click.option(
    "--restart", is_flag=True, help="Register a changed input afresh under an existing run id."
)
@_retry_failed_option
@_state_option
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default=None,
    help="Where the requests are sent from (default: the job's [job] engine, else local).",
)
@click.option("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start one).")
@click.option("--workers", type=int, help="Ray workers; each owns whole tenants (default 2).")
@click.option("--merge", is_flag=True, default=None, help="Ray: also keep one merged output file.")
@_exits
def submit(
    job: Path,
    run_id: str | None,
    strict: bool,
    restart: bool,
    retry_failed: bool,
    state: Path | None,
    engine: Literal["local", "ray"] | None,
    address: str | None,
    workers: int | None,
    merge: bool | None,
) -> None:
    """Register JOB's input and run it to the end.

    \b
    --run-id takes a template: {job}, {date} (UTC), {datetime}, {input_hash};
    e.g. '{job}-{date}' makes a second submit the same night continue the first.
    --engine ray spreads the tenants over Ray workers (pip install 'runner[ray]').
    """
    _run(
        functools.partial(
            api.run_job_async,
            job,
            run_id=run_id,
            state=state,
            strict=strict,
            restart=restart,
            retry_failed=retry_failed,
            engine=engine,
            address=address,
            workers=workers,
            merge=merge,
        )
    )


@main.command()
@click.argument("run_id")
@_retry_failed_option
@_state_option
@_exits
def resume(run_id: str, retry_failed: bool, state: Path | None) -> None:
    """Continue RUN_ID: resend what was in flight, retry what was deferred."""
    _run(functools.partial(api.resume_async, run_id, state=state, retry_failed=retry_failed))


def _run(start: Callable[..., Awaitable[api.RunResult]]) -> None:
    as_json = _log_format() == "json"
    display = ProgressDisplay(json_lines=as_json)
    try:
        result = eventloop.run(
            functools.partial(start, on_progress=display.update, handle_signals=True)
        )
    finally:
        display.close()
    if as_json:
        click.echo(json.dumps(_result_record(result)))
        sys.exit(result.exit_code)
    _finish(result)


def _result_record(result: api.RunResult) -> dict[str, object]:
    return {
        "event": "finished" if not result.interrupted else "interrupted",
        "run_id": result.run_id,
        "exit_code": result.exit_code,
        "state": str(result.state),
        "outputs": [str(path) for path in result.outputs],
        "counts": result.counts,
        "cost_usd": micros_to_usd(result.cost_micros),
        "tenants": [_tenant_record(t) for t in result.tenants],
        "problems": [
            {"tenant": tenant, "status": status, "error": error, "rows": rows}
            for tenant, status, error, rows in result.problems
        ],
    }


def _tenant_record(t: TenantCounts) -> dict[str, object]:
    return {
        "tenant": t.tenant,
        "by_status": {status.value: t.by_status.get(status.value, 0) for status in Status},
        "prompt_tokens": t.prompt_tokens,
        "cached_tokens": t.cached_tokens,
        "completion_tokens": t.completion_tokens,
        "cost_micros": t.cost_micros,
        "cost_usd": micros_to_usd(t.cost_micros),
        "resends": t.resends,
    }


def _finish(result: api.RunResult) -> None:
    if not result.tenants:  # a folder or glob input with no new file: logged already
        sys.exit(EXIT_OK)
    print_table(summary_table(f"run {result.run_id}", result.tenants))
    for tenant, status, error, rows in result.problems:
        click.echo(f"{tenant}: {rows} {status}: {error}")
    if result.requeued:
        click.echo(f"re-sent {result.requeued} request(s) that were in flight when the run stopped")
    click.echo(f"state: {result.state}")
    resume_hint = f"runner resume {result.run_id} --state {result.state}"
    counts = result.counts
    if result.interrupted:
        click.echo(f"interrupted; nothing is lost. Resume with: {resume_hint}", err=True)
    else:
        for path in result.outputs:
            click.echo(f"output: {path}")
        if counts.get("deferred"):
            click.echo(f"deferred rows are sent again by: {resume_hint}")
        if counts.get("failed"):
            click.echo(f"failed rows are sent again by: {resume_hint} --retry-failed")
    sys.exit(result.exit_code)


@main.command()
@click.argument("run_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_state_option
@_exits
def status(run_id: str | None, as_json: bool, state: Path | None) -> None:
    """Per-tenant counts by status, tokens and cost, for one run or all."""
    runs = api.status(run_id, state=state)
    if as_json:
        payload = [
            {
                "run_id": info.run_id,
                "job": info.job_name,
                "phase": info.phase,
                "rows": info.rows,
                "created_at": info.created_at,
                "updated_at": info.updated_at,
                "tenants": [_tenant_record(t) for t in tenants],
            }
            for info, tenants in runs
        ]
        click.echo(json.dumps(payload, indent=2))
        return
    if not runs:
        click.echo("no runs yet")
    for info, tenants in runs:
        title = f"run {info.run_id} ({info.job_name}, {info.phase}, {info.rows} rows)"
        print_table(summary_table(title, tenants))


_format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)


@main.command()
@click.option("--period", default=None, help="Month as YYYY-MM (default: this month, UTC).")
@_format_option
@_state_option
@_exits
def report(period: str | None, fmt: str, state: Path | None) -> None:
    """Per-tenant usage and spend for a month, against each budget."""
    with _open_store(state) as store:
        month = period or reports.current_month()
        rows = reports.as_dicts(reports.month_report(store, month))
    _render(f"spend in {month}", rows, fmt)


@main.command()
@click.argument("tenant")
@click.option("--period", default=None, help="Month as YYYY-MM (default: this month, UTC).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "csv", "table"]),
    default="json",
    show_default=True,
)
@_state_option
@_exits
def invoice(tenant: str, period: str | None, fmt: str, state: Path | None) -> None:
    """TENANT's invoice for a month: line items per model, top-ups, total."""
    with _open_store(state) as store:
        bill = reports.invoice_dict(
            reports.invoice(store, tenant, period or reports.current_month())
        )
    if fmt == "json":
        click.echo(json.dumps(bill, indent=2))
        return
    lines = [{"item": "usage", **line} for line in cast(list[dict[str, object]], bill["lines"])]
    topups = [{"item": "topup", **topup} for topup in cast(list[dict[str, object]], bill["topups"])]
    total = {"item": "total", "amount_usd": bill["total_usd"]}
    _render(f"invoice {tenant} {bill['period']}", [*lines, *topups, total], fmt)


@main.command()
@click.argument("tenant")
@click.argument("amount")
@click.option("--reason", required=True, help="Why the budget grows (kept in the ledger).")
@click.option(
    "--period", default=None, help="YYYY-MM, YYYY-MM-DD or 'total' (default: this month)."
)
@_state_option
@_exits
def topup(tenant: str, amount: str, reason: str, period: str | None, state: Path | None) -> None:
    """Add AMOUNT US dollars to TENANT's budget for a period."""
    with _open_store(state, create=True) as store:
        entry = reports.topup(store, tenant, amount, reason=reason, period=period)
    click.echo(
        f"topped up {tenant} by ${reports.usd(entry.amount_micros)} for {entry.period}; "
        "resume runs with deferred rows to send them"
    )


@main.command()
@click.argument("job", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@_state_option
@_exits
def estimate(job: Path, fmt: str, state: Path | None) -> None:
    """Dry run: rows, tokens and worst-case cost per tenant; nothing is sent."""
    spec = load_job(job)
    location = state or spec.job.state or api.state_path(None)
    store = Store(location, create=False) if Path(location).exists() else None
    try:
        rows = reports.estimate_dicts(reports.estimate(spec, store))
    finally:
        if store is not None:
            store.close()
    _render(f"estimate for {job}", rows, fmt)


@contextmanager
def _open_store(state: Path | None, *, create: bool = False) -> Iterator[Store]:
    store = Store(api.state_path(state), create=create)
    try:
        yield store
    finally:
        store.close()


def _render(title: str, rows: list[dict[str, object]], fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        columns = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: _cell(row.get(key)) for key in columns} for row in rows)
    else:
        print_table(rows_table(title, rows))


def _cell(value: object) -> object:
    return "" if value is None else ";".join(map(str, value)) if isinstance(value, list) else value


@main.command()
@click.option("--older-than", required=True, help="Age such as 30d, 12h or 2w.")
@_state_option
@_exits
def prune(older_than: str, state: Path | None) -> None:
    """Remove old finished runs' request rows; summaries and the ledger stay."""
    result = api.prune(_seconds(older_than), state=state)
    freed = max(0, result.bytes_before - result.bytes_after) / 1e6
    click.echo(
        f"pruned {len(result.runs)} run(s), {result.rows} request rows; the state database "
        f"went from {result.bytes_before / 1e6:.1f} MB to {result.bytes_after / 1e6:.1f} MB "
        f"({freed:.1f} MB freed)"
    )
    for run_id in result.runs:
        click.echo(f"  {run_id}")


def _seconds(age: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    number, unit = age[:-1], age[-1:]
    try:
        return float(number) * units[unit]
    except (KeyError, ValueError):
        message = f"{age!r}: expected a number and s, m, h, d or w, e.g. 30d"
        raise click.BadParameter(message, param_hint="--older-than") from None


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--latency", default=0.0, show_default=True, help="Seconds before each answer.")
@click.option("--rpm", type=int, help="Per-key requests per minute (strict window).")
@click.option("--tpm", type=int, help="Per-key tokens per minute (strict window).")
@click.option("--error-rate", default=0.0, show_default=True, help="Fraction answered 500/503.")
@click.option("--drop-rate", default=0.0, show_default=True, help="Fraction of dropped links.")
@click.option("--seed", default=0, show_default=True, type=int)
def simulate(
    host: str,
    port: int,
    latency: float,
    rpm: int | None,
    tpm: int | None,
    error_rate: float,
    drop_rate: float,
    seed: int,
) -> None:
    """Start the bundled OpenAI-compatible simulator (GET /stats shows what it saw)."""
    config = SimulatorConfig(
        latency_s=latency,
        rpm=rpm,
        tpm=tpm,
        error_rate=error_rate,
        drop_rate=drop_rate,
        seed=seed,
    )
    serve(config, host=host, port=port)
