"""The version of luasched (pyproject.toml reads it from here: one definition)."""

__version__ = "0.1.0"
