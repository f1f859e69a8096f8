"""The ``airlock`` command line."""

from __future__ import annotations

import typer

from airlock import service_cli

app = typer.Typer(no_args_is_help=True, help="The airlock: disclosure checks and release service.")


@app.callback()
def _root() -> None:
    """Disclosure checks and the release-review service."""


service_cli.register(app)  # serve, db, workflow: the review service


def main() -> None:
    app()


if __name__ == "__main__":
    main()
