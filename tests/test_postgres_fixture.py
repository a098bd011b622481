"""The session PostgreSQL fixture gives real, separate, UTF-8 databases."""

import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.postgres

TEXT = "Zusammenfassung: naïve café, 東京, Ωmega, emoji 📄"


def test_round_trip_non_ascii(fresh_postgres_url: str) -> None:
    engine = sa.create_engine(fresh_postgres_url)
    try:
        meta = sa.MetaData()
        notes = sa.Table(
            "notes",
            meta,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("body", sa.Text, nullable=False),
        )
        meta.create_all(engine)
        with engine.begin() as conn:
            conn.execute(notes.insert(), [{"id": 1, "body": TEXT}])
        with engine.connect() as conn:
            assert conn.execute(sa.select(notes.c.body)).scalar_one() == TEXT
            assert conn.execute(sa.text("SHOW server_encoding")).scalar_one() == "UTF8"
    finally:
        engine.dispose()


def test_fresh_databases_are_distinct(postgres_server, fresh_postgres_url: str) -> None:
    other_url = postgres_server.create_database("vf_test_other_" + fresh_postgres_url[-12:])
    assert other_url != fresh_postgres_url
    first, second = sa.create_engine(fresh_postgres_url), sa.create_engine(other_url)
    try:
        with first.begin() as conn:
            conn.execute(sa.text("CREATE TABLE only_here (x int)"))
        with first.connect() as conn:
            names = {conn.execute(sa.text("SELECT current_database()")).scalar_one()}
        with second.connect() as conn:
            names.add(conn.execute(sa.text("SELECT current_database()")).scalar_one())
            assert not sa.inspect(conn).has_table("only_here")
        assert len(names) == 2
    finally:
        first.dispose()
        second.dispose()
