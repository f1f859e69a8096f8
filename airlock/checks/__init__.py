"""Disclosure checks, one module per output class."""
