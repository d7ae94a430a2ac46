"""Blazil AI: AI inference and data loading for payment systems."""

__version__ = "0.1.0"
