"""The airlock: disclosure checks, release requests, two independent reviews, release."""

__version__ = "0.1.0"
