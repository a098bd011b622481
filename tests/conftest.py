"""Shared fixtures: each group lives in its own module under tests/fixtures."""

import pytest

pytest_plugins = [
    "tests.fixtures.prefect_api",
    "tests.fixtures.postgres",
    "tests.fixtures.models",
]


@pytest.fixture(scope="session", autouse=True)
def _inference_in_process():
    """Flows under test answer their batches in their own process (the embedded default), also
    when a test points them at a real Prefect server; tests of GPU workers say otherwise."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VRAMFLOW_INFERENCE", "in-process")
        yield
