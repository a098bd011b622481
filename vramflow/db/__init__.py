"""Persistence: typed SQLAlchemy models, the session factory, and queries as plain functions."""
