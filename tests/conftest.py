"""Shared fixtures: each group lives in its own module under tests/fixtures."""

pytest_plugins = [
    "tests.fixtures.prefect_api",
    "tests.fixtures.postgres",
    "tests.fixtures.models",
]
