"""How both command lines tell a person that something failed: one line on stderr, and exit with the
error's code. Messages quote what users wrote (ids, paths, addresses), so they are escaped before rich
reads them: `[b]` in a file name is text, not markup that would be eaten."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.markup import escape

from .errors import PipelineError

err = Console(stderr=True, soft_wrap=True)  # a message stays one line, whatever the width


def fail(exc: PipelineError, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps({"ok": False, **exc.to_dict()}))
    where = f" [dim](stage {escape(exc.stage)})[/dim]" if exc.stage else ""
    err.print(f"[bold red]error:[/bold red] {escape(exc.message)}{where}", highlight=False)
    if exc.hint:
        err.print(f"[yellow]hint:[/yellow] {escape(exc.hint)}", highlight=False)
    raise typer.Exit(exc.exit_code)
