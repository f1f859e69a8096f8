"""The childhood-cancer trusted research environment: platform package."""

__version__ = "0.1.0"
