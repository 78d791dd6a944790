"""`codsplat`: the control plane's command line. It loads the worker (torch, pycolmap) for `run`
alone, so every other command starts in a fraction of a second.

    codsplat run INPUT --out DIR ...      the pipeline, on this machine (the worker's own command line)
    codsplat validate job.json            every error, or the normalised job with defaults
    codsplat jobspec job.json [--stage]   the Bacalhau job specs the job becomes (YAML)
    codsplat submit job.json              run it on Bacalhau and follow it to the end
    codsplat nodes [--job job.json]       the Bacalhau nodes, and whether any can take a job
    codsplat status ID · codsplat logs ID · codsplat exit-codes
    codsplat daemon · codsplat jobs list|show|cancel · codsplat console
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.live import Live
from rich.table import Table

from codsplat.pipeline.contract import EXIT_CANNOT_RUN, EXIT_CODES, EXIT_INTERNAL, EXIT_INTERRUPTED, SPLIT, exit_code
from codsplat.pipeline.errors import CannotRun as CannotRunError
from codsplat.pipeline.errors import EnvironmentProblem, PipelineError, usage_error
from codsplat.pipeline.report import err, fail

from .job import load_job
from .settings import load_settings

if TYPE_CHECKING:  # the client loads only for the commands that talk to Bacalhau
    from .bacalhau import BacalhauError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="codsplat: video or photos in, 3D Gaussian splat out; on this machine, Bacalhau or SageMaker.")
jobs_app = typer.Typer(help="Read and change job records.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
SettingsOption = typer.Option(None, "--settings", help="Deployment settings file (YAML/JSON); CODSPLAT_* variables override it.")
EmbeddedOption = typer.Option(None, "--embedded", help="Run with no AWS: this folder is the bucket, SQLite the table.")


def _load(job_path: Path, settings_path: Path | None):
    settings = load_settings(settings_path)
    return settings, load_job(job_path, settings.policy)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False,
             help="Turn a capture into a Gaussian splat on this machine: frames → SfM → training → export. "
                  "`codsplat run --help` lists its options.")
def run(ctx: typer.Context) -> None:
    from codsplat.pipeline.cli import app as worker  # torch, pycolmap: loaded here and only here

    worker(["run", *ctx.args], prog_name="codsplat")


@app.command("exit-codes")
def exit_codes() -> None:
    """List the exit codes that codsplat commands use, and what each means."""
    for c in EXIT_CODES.values():
        print(f"{c.code:>3}  {c.meaning}")


@app.command()
def validate(
    job: Path = typer.Argument(..., help="The job document (JSON or YAML)."),
    settings: Optional[Path] = SettingsOption,
) -> None:
    """Check a job document: print every error, or the normalised job with defaults filled in."""
    try:
        _, doc = _load(job, settings)
    except PipelineError as exc:
        fail(exc)
    print(json.dumps(doc.model_dump(mode="json"), indent=2))


@app.command()
def jobspec(
    job: Path = typer.Argument(..., help="The job document (JSON or YAML)."),
    stage: Optional[str] = typer.Option(None, "--stage", help="Only this stage: all, preprocess, train or export."),
    output: str = typer.Option("yaml", "--format", help="yaml (for `bacalhau job run`) or json (the API's body)."),
    settings: Optional[Path] = SettingsOption,
) -> None:
    """Print the Bacalhau job specs that a job document becomes (first attempt of each stage)."""
    from .compute import stages_of
    from .translate import translate_all

    try:
        conf, doc = _load(job, settings)
        specs = translate_all(doc, conf)
        if stage is not None:
            names = list(stages_of(doc))
            if stage not in names:
                raise usage_error(f"--stage must be one of {', '.join(names)} for this job "
                                  f"(compute.split_stages is {str(doc.compute.split_stages).lower()}).")
            specs = [specs[names.index(stage)]]
    except PipelineError as exc:
        fail(exc)
    if output == "json":
        print(json.dumps(specs if len(specs) > 1 else specs[0], indent=2))
    else:
        print(yaml.safe_dump_all(specs, sort_keys=False, width=1000), end="")


def _client(settings_path: Path | None = None):
    from .bacalhau import BacalhauClient

    return BacalhauClient.from_settings(load_settings(settings_path))


def bacalhau_failure(exc: BacalhauError) -> PipelineError:
    """A Bacalhau refusal as the command line reports it: a key it refuses is the deployment's to fix
    (exit 5); anything else means Bacalhau cannot run the job (exit 6)."""
    from .bacalhau import Unauthorized

    if isinstance(exc, Unauthorized):
        return EnvironmentProblem(exc.message)
    return CannotRunError(f"Bacalhau: {exc.message}")


@app.command()
def submit(
    job: Path = typer.Argument(..., help="The job document (JSON or YAML); its input must already be in S3."),
    backend: str = typer.Option("bacalhau", "--backend", help="bacalhau"),
    settings: Optional[Path] = SettingsOption,
    poll: float = typer.Option(2.0, "--poll", help="Seconds between state checks."),
) -> None:
    """Run a job on Bacalhau and follow it to the end, stage by stage, retrying crashed attempts.
    Exits with the worker's own code (2 input, 3 reconstruction, 4 quality gate), or 6 when Bacalhau
    cannot run it."""
    from .bacalhau import BacalhauError
    from .compute import Attempt, CannotRun, Done, Fail, Misconfigured, Stopped, Submit, decide, first_step, upstream_of
    from .executors.bacalhau import BacalhauExecutor, exhausted, result_of, stop_exhausted

    if backend != "bacalhau":
        fail(usage_error(f"--backend must be 'bacalhau' here, got {backend!r}.", hint="The daemon runs the other backends."))
    try:
        conf, doc = _load(job, settings)
    except PipelineError as exc:
        fail(exc)
    conf = conf.model_copy(update={"bacalhau_poll_seconds": poll})
    with _client(settings) as client:
        executor = BacalhauExecutor(client, conf)
        rows: dict[str, list[str]] = {}
        attempts: list[Attempt] = []

        def render() -> Table:
            t = Table(title=f"codsplat job {doc.id}", title_justify="left")
            for column in ("stage", "attempt", "bacalhau job", "state", "time"):
                t.add_column(column)
            for row in rows.values():
                t.add_row(*row)
            return t

        try:
            executor.preflight(doc)
            step, started = first_step(doc), time.monotonic()
            with Live(render(), console=err, refresh_per_second=4) as live:
                while True:
                    attempt = Attempt.new("bacalhau", doc.id, step.stage, step.number)
                    executor.submit(doc, attempt, upstream_of(attempts))
                    attempts.append(attempt)
                    while True:  # follow it: one describe per poll, with its executions (exhausted() reads them)
                        info = client.describe(attempt.remote_id, executions=True)
                        rows[attempt.name] = [attempt.stage, str(attempt.number), attempt.remote_id, info.state.value,
                                              f"{time.monotonic() - started:.0f} s"]
                        live.update(render())
                        if info.state.terminal:
                            break
                        if exhausted(info, doc.compute.retries + 1):
                            stop_exhausted(client, info)
                            break
                        time.sleep(poll)
                    result = result_of(info)
                    attempt.state, attempt.ending = result.ending.state, result.ending.value
                    attempt.exit_code, attempt.executions, attempt.error = result.exit_code, result.executions, result.message
                    decision = decide(doc, attempts, attempt, result)
                    if not isinstance(decision, Submit):
                        break
                    step = decision
        except CannotRun as exc:
            decision = exc
        except Misconfigured as exc:
            fail(EnvironmentProblem(str(exc)))
        except BacalhauError as exc:
            fail(bacalhau_failure(exc))
        except KeyboardInterrupt:
            err.print(f"[yellow]interrupted[/yellow]; the Bacalhau jobs go on: codsplat status {doc.id}")
            raise typer.Exit(EXIT_INTERRUPTED)
    if isinstance(decision, Done):
        out = doc.output_uri(conf.policy)
        err.print(f"results: {escape(str(out))}export/")
        print(json.dumps({"ok": True, "job": doc.id, "output": str(out), "attempts": [a.to_dict() for a in attempts]}, indent=2))
        return
    if isinstance(decision, Fail):
        err.print(f"[bold red]error:[/bold red] {escape(decision.message)} [dim](stage {decision.stage})[/dim]", highlight=False)
        err.print(f"[yellow]hint:[/yellow] {exit_code(decision.exit_code).advice}", highlight=False)
        raise typer.Exit(decision.exit_code)
    reason = "Bacalhau stopped the job" if isinstance(decision, Stopped) else decision.reason
    err.print(f"[bold red]cannot run on Bacalhau:[/bold red] {escape(str(reason))}", highlight=False)
    raise typer.Exit(EXIT_CANNOT_RUN)


@app.command()
def nodes(
    job: Optional[Path] = typer.Option(None, "--job", help="A job document: can any node take it, and if not, why?"),
    settings: Optional[Path] = SettingsOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List the Bacalhau compute nodes with their GPUs, labels and free capacity."""
    from .bacalhau import BacalhauError
    from .executors.bacalhau import placement

    try:
        conf = load_settings(settings)
        doc = load_job(job, conf.policy) if job else None
        with _client(settings) as client:
            found = client.nodes()
    except PipelineError as exc:
        fail(exc, as_json)
    except BacalhauError as exc:
        fail(bacalhau_failure(exc), as_json)
    fits, problems = placement(doc, conf, found) if doc else ({}, [])
    if as_json:
        print(json.dumps({"nodes": [{"id": n.id, "connected": n.connected, "approved": n.approved, "labels": n.labels,
                                     "gpus": [g.__dict__ for g in n.gpus], "max": n.max.__dict__, "available": n.available.__dict__}
                                    for n in found], "fits": fits, "problems": problems}, indent=2))
    else:
        table = Table(title="Bacalhau compute nodes", title_justify="left")
        for column in ("node", "state", "GPUs", "free CPU", "free memory", "free disk", "free GPUs", "labels"):
            table.add_column(column)
        for n in found:
            gpus = ", ".join(f"{g.name} ({g.memory_mib:,} MiB)" for g in n.gpus) or "none"
            table.add_row(n.id, "connected" if n.connected else "disconnected", gpus, f"{n.available.cpu:g}",
                          f"{n.available.memory / 1e9:.1f} GB", f"{n.available.disk / 1e9:.0f} GB", str(n.available.gpu),
                          " ".join(f"{k}={v}" for k, v in sorted(n.labels.items())))
        Console(width=max(160, Console().width)).print(table)
        if doc:
            for stage, names in fits.items():
                err.print(f"{stage}: " + (f"fits on {', '.join(names)}" if names else "no node fits"))
            for problem in problems:
                err.print(f"[bold red]cannot run:[/bold red] {escape(str(problem))}", highlight=False)
    if problems:
        raise typer.Exit(EXIT_CANNOT_RUN)


@app.command()
def status(job_id: str = typer.Argument(..., help="The codsplat job id."), settings: Optional[Path] = SettingsOption) -> None:
    """Show every Bacalhau attempt of a job: stage, state, exit code, and why it failed."""
    from .bacalhau import BacalhauError
    from .executors.bacalhau import result_of

    try:
        with _client(settings) as client:
            jobs = [client.describe(j.id) for j in client.list_jobs(labels={"codsplat-job": job_id})]
    except BacalhauError as exc:
        fail(PipelineError(f"Bacalhau: {exc.message}"))
    if not jobs:
        fail(PipelineError(f"No Bacalhau job carries the label codsplat-job={job_id}.", hint="Check the id."))
    table = Table(title=f"codsplat job {job_id}", title_justify="left")
    for column in ("stage", "name", "bacalhau job", "state", "exit", "detail"):
        table.add_column(column)
    order = {s: i for i, s in enumerate(("all", *SPLIT))}
    for j in sorted(jobs, key=lambda j: (order.get(j.labels.get("codsplat-stage", ""), 9), j.create_time)):
        result = result_of(j) if j.state.terminal else None
        detail = "" if result is None or result.exit_code == 0 else result.message.splitlines()[0] if result.message else ""
        code = "" if result is None or result.exit_code is None else str(result.exit_code)
        table.add_row(j.labels.get("codsplat-stage", "?"), j.name, j.id, j.state.value, code, detail[:160])
    Console(width=max(160, Console().width)).print(table)


@app.command()
def logs(job_id: str = typer.Argument(..., help="The codsplat job id."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends."),
         settings: Optional[Path] = SettingsOption) -> None:
    """Print the container output of a job's latest attempt of each stage (best effort)."""
    from .bacalhau import BacalhauError

    try:
        with _client(settings) as client:
            latest: dict[str, object] = {}
            for j in sorted(client.list_jobs(labels={"codsplat-job": job_id}), key=lambda j: j.create_time):
                latest[j.labels.get("codsplat-stage", "?")] = j
            if not latest:
                fail(PipelineError(f"No Bacalhau job carries the label codsplat-job={job_id}."))
            for stage, j in latest.items():
                err.print(f"[bold]── {stage}: {escape(j.name)} ({j.id})[/bold]")
                for stream, line in client.logs(j.id, follow=follow):
                    print(line, end="" if line.endswith("\n") else "\n")
    except BacalhauError as exc:
        fail(PipelineError(f"Bacalhau: {exc.message}"))


@app.command()
def daemon(
    embedded: Optional[Path] = EmbeddedOption,
    settings: Optional[Path] = SettingsOption,
    health_port: Optional[int] = typer.Option(None, "--health-port", help="Serve /health on 127.0.0.1 (0 = off)."),
) -> None:
    """Run the orchestrator: take job uploads, run them, record and notify. Stops cleanly on SIGTERM."""
    from .backends import build_daemon, setup_logging

    try:
        conf = load_settings(settings)
        setup_logging()
        built = build_daemon(conf, embedded)
    except PipelineError as exc:
        fail(exc)
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
    trusted_proxies: list[str] = typer.Option([], "--trusted-proxy", help="Address of a proxy or load balancer whose "
                                              "X-Forwarded-For names the client (repeat). Without one, no such header is believed."),
) -> None:
    """Serve the web console: upload a capture, watch jobs, look at splats in the browser."""
    import secrets
    import signal
    import subprocess

    import uvicorn

    from .backends import setup_logging
    from .console import build_console
    from .console.auth import Guard, is_loopback

    if no_login and not is_loopback(host):
        fail(usage_error(f"--no-login is only allowed on 127.0.0.1, and --host is {host}.",
                         "Drop --no-login; the console prints a login token."))
    if not no_login and not token:
        token = secrets.token_urlsafe(24)
    hosts = set(h.lower() for h in allowed_hosts)
    if is_loopback(host) and not hosts:  # a web page's DNS name pointed at 127.0.0.1 must not reach us
        hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}
    elif not hosts:
        err.print(f"[yellow]warning:[/yellow] --host {host} without --allowed-host: any Host header is answered, so a "
                  "web page on a name that resolves here could reach the console (DNS rebinding). Pass "
                  "--allowed-host with the name people use.")
    secret = os.environ.get("CODSPLAT_CONSOLE_SECRET")  # the same on every instance behind a load balancer
    guard = Guard(token=None if no_login else token, allowed_hosts=frozenset(hosts) or None, secure_cookies=secure_cookies,
                  **({"secret": secret.encode()} if secret else {}))
    try:
        conf = load_settings(settings)
        setup_logging()
        web = build_console(conf, guard, embedded)
    except PipelineError as exc:
        fail(exc)
    child = None
    if embedded is not None and run_daemon:
        command = [sys.executable, "-m", "codsplat.orchestrator.cli", "daemon", "--embedded", str(embedded), "--health-port", "0"]
        # the daemon gets SIGTERM when the console ends, however it ends (uvicorn re-raises SIGTERM,
        # so a `finally` here would not run); nothing else runs yet, so preexec_fn is safe
        # the console's secrets stay with the console: not the daemon's, nor any pipeline run's business
        env = {k: v for k, v in os.environ.items() if k not in ("CODSPLAT_CONSOLE_TOKEN", "CODSPLAT_CONSOLE_SECRET")}
        child = subprocess.Popen(command + (["--settings", str(settings)] if settings else []), preexec_fn=_die_with_parent,
                                 env=env)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    err.print(f"codsplat console on [bold]http://{shown}:{port}/[/bold]" + (f"  login token: [bold]{token}[/bold]" if token else ""))
    try:
        # the login's rate limit is keyed on the client's address: a header that names it is believed
        # only from a proxy the operator named (uvicorn would otherwise believe any local process)
        uvicorn.run(web, host=host, port=port, log_level="warning", proxy_headers=bool(trusted_proxies),
                    forwarded_allow_ips=",".join(trusted_proxies) or None)
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
    from .backends import Backends

    return Backends(load_settings(settings), embedded).store


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
        fail(exc)
    if record is None:
        fail(usage_error(f"No job record {job_id!r}.", "`codsplat jobs list` shows the ids."))
    print(json.dumps(json.loads(record.to_json()), indent=2))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, embedded: Optional[Path] = EmbeddedOption, settings: Optional[Path] = SettingsOption) -> None:
    """Cancel a job: at once if it has not started, else the daemon stops its run at its next check."""
    from .records import CANCELLED, InvalidTransition, request_cancel

    try:
        record = request_cancel(_store(embedded, settings), job_id)
    except KeyError:
        fail(usage_error(f"No job record {job_id!r}.", "`codsplat jobs list` shows the ids."))
    except InvalidTransition as exc:
        fail(usage_error(str(exc)))
    except PipelineError as exc:
        fail(exc)
    err.print(f"{job_id}: {record.state}" + (" (cancel requested)" if record.state != CANCELLED else ""))


def main() -> None:
    try:
        app()
    except Exception as exc:  # a bug: one line, the traceback only when asked for
        if os.environ.get("CODSPLAT_DEBUG"):
            raise
        err.print(f"[bold red]error:[/bold red] Internal error: {exc.__class__.__name__}: {escape(str(exc))}", highlight=False)
        err.print("[yellow]hint:[/yellow] Set CODSPLAT_DEBUG=1 for the traceback and report it.")
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
