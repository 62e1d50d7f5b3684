"""Shared CLI scaffolding: both console scripts get the same --version and -v/--verbose."""

from __future__ import annotations

import ipaddress

import typer

from hmgdm_core import __version__
from hmgdm_core.exceptions import ConfigError


def new_app(name: str, help: str) -> typer.Typer:
    """A typer app named `name` with --version, -v/--verbose and rich logging set up."""
    app = typer.Typer(
        name=name,
        help=help,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    def _version(value: bool) -> None:
        if value:
            typer.echo(f"{name} {__version__}")
            raise typer.Exit()

    @app.callback()
    def main(
        verbose: int = typer.Option(
            0, "--verbose", "-v", count=True, help="More log output (-v debug, -vv libraries too)."
        ),
        version: bool = typer.Option(
            False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ) -> None:
        from hmgdm_core.log import setup_logging

        setup_logging(verbose)

    main.__doc__ = help
    return app


def check_plaintext(host: str) -> None:
    """`--insecure` means no TLS and no SuperNode authentication: only ever on loopback (tests,
    one machine); a ConfigError for any other address."""
    name = host.strip("[]")
    try:
        loopback = ipaddress.ip_address(name).is_loopback
    except ValueError:
        loopback = name == "localhost"
    if not loopback:
        raise ConfigError(
            f"--insecure with {host}: plaintext without node authentication is only for "
            "127.0.0.1 (one machine); use TLS for any other address"
        )


def fail(err: Exception) -> typer.Exit:
    """Print `err` as one line on stderr; the Exit (code 2) for the command to raise."""
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)
