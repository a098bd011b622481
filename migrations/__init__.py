"""Alembic migrations of the results database (configured in code: vramflow.db.migrate)."""
