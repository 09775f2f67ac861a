"""`scistream`: project-level commands (the demo, the doctor)."""

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


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    options_metavar="[S2CS OPTIONS]",
)
def doctor(ctx: typer.Context) -> None:
    """Check this gateway's set-up: `s2cs --check` with the same options.

    Give the options the s2cs of this gateway is started with (`s2cs --help` lists them), and
    --json for a JSON list. One line per check (the proxies, the control port and the port
    range, the certificate, the state dir and its lock, authentication, the target policy, and
    the host's tuning for wide-area streams: give --path-rtt 50ms --path-rate 10G to check the
    socket buffers against a path): OK, WARN or FAIL, and what to do. Exits 1 when a check
    FAILs. Starts, creates and writes nothing.
    """
    from .s2cs.cli import main as s2cs

    s2cs(["--check", *ctx.args], prog_name="scistream doctor")


def main() -> None:
    app(prog_name="scistream")
