"""The demo: synthetic pooled data, example projects, demo accounts, hub and airlock."""

from __future__ import annotations


def run_demo(tour: bool = False) -> int:
    """Start the demo; return the process exit status."""
    raise NotImplementedError("the demo lands with the provisioning issue")
