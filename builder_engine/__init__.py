"""Shared core of Builder Engine: configuration, SQL models and domain types."""

__version__ = "0.1.0"
