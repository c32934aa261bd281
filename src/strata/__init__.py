"""Strata: serverless PostgreSQL in Python (see README.md and docs/)."""

__version__ = "0.1.0"
