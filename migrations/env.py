"""Alembic environment: run migrations on the connection vramflow.db.migrate hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from vramflow.db.models import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata


def _render_item(kind: str, obj, autogen_context):
    # Migrations must not import vramflow's column types: render them as their plain impl.
    if kind == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _options(dialect_name: str) -> dict:
    # SQLite cannot ALTER most things in place: batch mode copies the table instead.
    return {
        "target_metadata": target_metadata,
        "compare_type": True,
        "compare_server_default": True,
        "render_as_batch": dialect_name == "sqlite",
        "render_item": _render_item,
    }


def run_offline() -> None:
    """Write the SQL to stdout (`alembic upgrade --sql`) instead of running it."""
    url = config.get_main_option("sqlalchemy.url")
    dialect_name = url.split(":", 1)[0].split("+", 1)[0]
    context.configure(url=url, literal_binds=True, **_options(dialect_name))
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(connection=connection, **_options(connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from vramflow.db.migrate import migration_engine

    engine = migration_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
