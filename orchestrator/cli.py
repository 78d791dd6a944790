"""`codsplat` command line: the pipeline's `run`, plus job documents and Bacalhau.

    codsplat validate job.json            every error, or the normalised job with defaults
    codsplat jobspec job.json [--stage]   the Bacalhau job specs the job becomes (YAML)
    codsplat submit job.json --backend bacalhau
    codsplat status JOB_ID · codsplat logs JOB_ID
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from codsplat.pipeline.cli import app, err, fail
from codsplat.pipeline.errors import EXIT_INTERNAL, EXIT_USAGE, PipelineError

from .bacalhau import BacalhauClient, BacalhauError
from .job import load_job
from .runner import Attempt, BacalhauRunner, CannotRunHere, Hooks, JobFailed
from .settings import load_settings
from .translate import SPLIT, stages_of, translate_all

EXIT_CANNOT_RUN = 6  # Bacalhau cannot run the job here (no GPU node, queue timeout, repeated failures)
SettingsOption = typer.Option(None, "--settings", help="Deployment settings file (YAML/JSON); CODSPLAT_* variables override it.")


def _usage(message: str, hint: str | None = None) -> PipelineError:
    exc = PipelineError(message, hint=hint)
    exc.exit_code = EXIT_USAGE
    return exc


def _load(job_path: Path, settings_path: Path | None):
    settings = load_settings(settings_path)
    return settings, load_job(job_path, settings.policy)


@app.command()
def validate(
    job: Path = typer.Argument(..., help="The job document (JSON or YAML)."),
    settings: Optional[Path] = SettingsOption,
) -> None:
    """Check a job document: print every error, or the normalised job with defaults filled in."""
    try:
        _, doc = _load(job, settings)
    except PipelineError as exc:
        fail(exc, as_json=False)
    print(json.dumps(doc.model_dump(mode="json"), indent=2))


@app.command()
def jobspec(
    job: Path = typer.Argument(..., help="The job document (JSON or YAML)."),
    stage: Optional[str] = typer.Option(None, "--stage", help="Only this stage: all, preprocess, train or export."),
    output: str = typer.Option("yaml", "--format", help="yaml (for `bacalhau job run`) or json (the API's body)."),
    settings: Optional[Path] = SettingsOption,
) -> None:
    """Print the Bacalhau job specs that a job document becomes (first attempt of each stage)."""
    try:
        conf, doc = _load(job, settings)
        specs = translate_all(doc, conf.deployment)
        if stage is not None:
            names = list(stages_of(doc))
            if stage not in names:
                raise _usage(f"--stage must be one of {', '.join(names)} for this job "
                             f"(compute.split_stages is {str(doc.compute.split_stages).lower()}).")
            specs = [specs[names.index(stage)]]
    except PipelineError as exc:
        fail(exc, as_json=False)
    if output == "json":
        print(json.dumps(specs if len(specs) > 1 else specs[0], indent=2))
    else:
        print(yaml.safe_dump_all(specs, sort_keys=False, width=1000), end="")


def _client() -> BacalhauClient:
    return BacalhauClient.from_env()


@app.command()
def submit(
    job: Path = typer.Argument(..., help="The job document (JSON or YAML); its input must already be in S3."),
    backend: str = typer.Option("bacalhau", "--backend", help="bacalhau"),
    settings: Optional[Path] = SettingsOption,
    poll: float = typer.Option(2.0, "--poll", help="Seconds between state checks."),
) -> None:
    """Submit a job to Bacalhau and follow it to the end, stage by stage."""
    if backend != "bacalhau":
        fail(PipelineError(f"--backend must be 'bacalhau' here, got {backend!r}.", hint="The daemon runs the other backends."), False)
    try:
        conf, doc = _load(job, settings)
    except PipelineError as exc:
        fail(exc, as_json=False)
    title = f"codsplat job {doc.id}"
    rows: dict[str, list[str]] = {}
    started: dict[str, float] = {}

    def render() -> Table:
        t = Table(title=title, title_justify="left")
        for column in ("stage", "attempt", "bacalhau job", "state", "time"):
            t.add_column(column)
        for row in rows.values():
            t.add_row(*row)
        return t

    with _client() as client, Live(render(), console=err, refresh_per_second=4) as live:
        def update(attempt: Attempt, info=None) -> None:
            started.setdefault(attempt.name, time.monotonic())
            rows[attempt.name] = [attempt.stage, str(attempt.number), attempt.bacalhau_id or "…",
                                  attempt.state or "submitting", f"{time.monotonic() - started[attempt.name]:.0f} s"]
            live.update(render())

        hooks = Hooks(before_submit=update, submitted=update, progress=update)
        try:
            result = BacalhauRunner(client, conf.deployment, poll_interval=poll).run(doc, hooks)
        except CannotRunHere as exc:
            err.print(f"[bold red]cannot run on Bacalhau:[/bold red] {exc.reason}")
            raise typer.Exit(EXIT_CANNOT_RUN)
        except JobFailed as exc:
            err.print(f"[bold red]error:[/bold red] {exc.message} [dim](stage {exc.stage})[/dim]", highlight=False)
            raise typer.Exit(exc.exit_code or EXIT_INTERNAL)
    out = doc.output_uri(conf.policy)
    err.print(f"results: s3://{out.bucket}/{result.output_key}export/")
    print(json.dumps({"ok": True, "job": doc.id, "output": f"s3://{out.bucket}/{result.output_key}",
                      "attempts": [a.__dict__ for a in result.attempts]}, indent=2))


@app.command()
def status(job_id: str = typer.Argument(..., help="The codsplat job id.")) -> None:
    """Show every Bacalhau attempt of a job: stage, state, and why it failed."""
    try:
        with _client() as client:
            jobs = client.list_jobs(labels={"codsplat-job": job_id})
            jobs = [client.describe(j.id) for j in jobs]
    except BacalhauError as exc:
        fail(PipelineError(f"Bacalhau: {exc.message}"), False)
    if not jobs:
        fail(PipelineError(f"No Bacalhau job carries the label codsplat-job={job_id}.", hint="Check the id."), False)
    table = Table(title=f"codsplat job {job_id}", title_justify="left")
    for column in ("stage", "name", "bacalhau job", "state", "detail"):
        table.add_column(column)
    order = {s: i for i, s in enumerate(("all", *SPLIT))}
    for j in sorted(jobs, key=lambda j: (order.get(j.labels.get("codsplat-stage", ""), 9), j.create_time)):
        detail = ""
        if j.state.value == "Failed":
            detail = j.message or (j.executions[-1].failure.splitlines()[-1] if j.executions and j.executions[-1].failure else "")
        table.add_row(j.labels.get("codsplat-stage", "?"), j.name, j.id, j.state.value, detail[:160])
    Console(width=max(160, Console().width)).print(table)


@app.command()
def logs(job_id: str = typer.Argument(..., help="The codsplat job id."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends.")) -> None:
    """Print the container output of a job's latest attempt of each stage (best effort)."""
    try:
        with _client() as client:
            jobs = client.list_jobs(labels={"codsplat-job": job_id})
            latest: dict[str, object] = {}
            for j in sorted(jobs, key=lambda j: j.create_time):
                latest[j.labels.get("codsplat-stage", "?")] = j
            if not latest:
                fail(PipelineError(f"No Bacalhau job carries the label codsplat-job={job_id}."), False)
            for stage, j in latest.items():
                err.print(f"[bold]── {stage}: {j.name} ({j.id})[/bold]")
                for stream, line in client.logs(j.id, follow=follow):
                    print(line, end="" if line.endswith("\n") else "\n")
    except BacalhauError as exc:
        fail(PipelineError(f"Bacalhau: {exc.message}"), False)


EmbeddedOption = typer.Option(None, "--embedded", help="Run with no AWS: this folder is the bucket, SQLite the table.")
jobs_app = typer.Typer(help="Read and change job records.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@app.command()
def daemon(
    embedded: Optional[Path] = EmbeddedOption,
    settings: Optional[Path] = SettingsOption,
    health_port: Optional[int] = typer.Option(None, "--health-port", help="Serve /health on 127.0.0.1 (0 = off)."),
) -> None:
    """Run the orchestrator: take job uploads, run them, record and notify. Stops cleanly on SIGTERM."""
    from .assemble import build_daemon, setup_logging

    try:
        conf = load_settings(settings)
        setup_logging()
        built = build_daemon(conf, embedded)
    except PipelineError as exc:
        fail(exc, as_json=False)
    port = conf.health_port if health_port is None else health_port
    built.serve(health_port=port or None, grace_seconds=conf.shutdown_grace_seconds)


@app.command()
def console(
    embedded: Optional[Path] = EmbeddedOption,
    settings: Optional[Path] = SettingsOption,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Beyond loopback a login is required."),
    port: int = typer.Option(8765, "--port"),
    token: Optional[str] = typer.Option(None, "--token", envvar="CODSPLAT_CONSOLE_TOKEN",
                                        help="Login token (default: a new random one, printed at start)."),
    no_login: bool = typer.Option(False, "--no-login", help="No login at all; only allowed on 127.0.0.1."),
    run_daemon: bool = typer.Option(True, "--daemon/--no-daemon", help="Embedded mode: also run the daemon that runs the jobs."),
    allowed_hosts: list[str] = typer.Option([], "--allowed-host", help="Host names the console answers to (repeat; behind a load balancer, its name)."),
    secure_cookies: bool = typer.Option(False, "--secure-cookies", help="Behind HTTPS: send cookies only over HTTPS."),
) -> None:
    """Serve the web console: upload a capture, watch jobs, look at splats in the browser."""
    import secrets
    import signal
    import subprocess

    import uvicorn

    from .assemble import setup_logging
    from .console import build_console
    from .console.auth import Guard, is_loopback

    if no_login and not is_loopback(host):
        fail(_usage(f"--no-login is only allowed on 127.0.0.1, and --host is {host}.",
                    "Drop --no-login; the console prints a login token."), False)
    if not no_login and not token:
        token = secrets.token_urlsafe(24)
    hosts = set(h.lower() for h in allowed_hosts)
    if is_loopback(host) and not hosts:  # a web page's DNS name pointed at 127.0.0.1 must not reach us
        hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}
    secret = os.environ.get("CODSPLAT_CONSOLE_SECRET")  # the same on every instance behind a load balancer
    guard = Guard(token=None if no_login else token, allowed_hosts=frozenset(hosts) or None, secure_cookies=secure_cookies,
                  **({"secret": secret.encode()} if secret else {}))
    try:
        conf = load_settings(settings)
        setup_logging()
        web = build_console(conf, guard, embedded)
    except PipelineError as exc:
        fail(exc, as_json=False)
    child = None
    if embedded is not None and run_daemon:
        command = [sys.executable, "-m", "codsplat.orchestrator.cli", "daemon", "--embedded", str(embedded), "--health-port", "0"]
        # the daemon gets SIGTERM when the console ends, however it ends (uvicorn re-raises SIGTERM,
        # so a `finally` here would not run); nothing else runs yet, so preexec_fn is safe
        child = subprocess.Popen(command + (["--settings", str(settings)] if settings else []), preexec_fn=_die_with_parent)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    err.print(f"codsplat console on [bold]http://{shown}:{port}/[/bold]" + (f"  login token: [bold]{token}[/bold]" if token else ""))
    try:
        uvicorn.run(web, host=host, port=port, log_level="warning", proxy_headers=True)
    finally:
        if child is not None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()


def _die_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _store(embedded: Path | None, settings: Path | None):
    from .assemble import store_for

    return store_for(load_settings(settings), embedded)


@jobs_app.command("list")
def jobs_list(
    state: Optional[str] = typer.Option(None, "--state", help="Only records in this state (e.g. RUNNING)."),
    embedded: Optional[Path] = EmbeddedOption,
    settings: Optional[Path] = SettingsOption,
    as_json: bool = typer.Option(False, "--json"),
    limit: int = typer.Option(50, "--limit"),
) -> None:
    """List job records, newest first."""
    try:
        records = _store(embedded, settings).list(state.upper() if state else None, limit)
    except PipelineError as exc:
        fail(exc, as_json)
    if as_json:
        print(json.dumps([json.loads(r.to_json()) for r in records], indent=2))
        return
    table = Table(title="codsplat jobs", title_justify="left")
    for column in ("job", "state", "stage", "backend", "updated", "PSNR", "error"):
        table.add_column(column)
    for r in records:
        psnr = (r.result or {}).get("metrics", {}).get("psnr")
        table.add_row(r.job_id, r.state, r.stage or "", r.backend or "", r.updated_at[:19],
                      f"{psnr:.2f}" if psnr else "", ((r.error or {}).get("message") or "")[:80])
    Console(width=max(160, Console().width)).print(table)


@jobs_app.command("show")
def jobs_show(job_id: str, embedded: Optional[Path] = EmbeddedOption, settings: Optional[Path] = SettingsOption) -> None:
    """Print one record: state, history, attempts, result or error."""
    try:
        record = _store(embedded, settings).get(job_id)
    except PipelineError as exc:
        fail(exc, False)
    if record is None:
        fail(_usage(f"No job record {job_id!r}.", "`codsplat jobs list` shows the ids."), False)
    print(json.dumps(json.loads(record.to_json()), indent=2))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, embedded: Optional[Path] = EmbeddedOption, settings: Optional[Path] = SettingsOption) -> None:
    """Cancel a job: at once if it has not started, else the daemon stops its run at its next check."""
    from .records import CANCELLED, InvalidTransition, request_cancel

    try:
        record = request_cancel(_store(embedded, settings), job_id)
    except KeyError:
        fail(_usage(f"No job record {job_id!r}.", "`codsplat jobs list` shows the ids."), False)
    except InvalidTransition as exc:
        fail(_usage(str(exc)), False)
    except PipelineError as exc:
        fail(exc, False)
    err.print(f"{job_id}: {record.state}" + (" (cancel requested)" if record.state != CANCELLED else ""))


def main() -> None:
    try:
        app()
    except Exception as exc:  # a bug: one line, the traceback only when asked for
        if os.environ.get("CODSPLAT_DEBUG"):
            raise
        err.print(f"[bold red]error:[/bold red] Internal error: {exc.__class__.__name__}: {exc}", highlight=False)
        err.print("[yellow]hint:[/yellow] Set CODSPLAT_DEBUG=1 for the traceback and report it.")
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
