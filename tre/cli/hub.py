"""`tre hub` commands."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)

# Local demo accounts (owned by the login work, tre/cli/hub_users.py).
from tre.cli import hub_users  # noqa: E402

hub_users.register(app)
