"""`scistream`: project-level commands (the demo)."""

from __future__ import annotations

import typer

from . import __version__

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"scistream {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """SciStream: authenticated, encrypted, rate-limited streams between facilities."""


@app.command()
def demo() -> None:
    """Two gateways on 127.0.0.1, a stream through them, checked end to end."""
    from .demo import run

    raise typer.Exit(run())


def main() -> None:
    app(prog_name="scistream")
