"""Strata: serverless PostgreSQL in Python (see docs/ and ../shared/docs/architecture.md)."""

__version__ = "0.1.0"
