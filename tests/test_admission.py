"""Admission by measured memory: a device's slot counts MiB, and holders that fit share it.

Two processes, each an engine with its own model (of different sizes), hold one device's slot on
a real Prefect server. When the device (its size set by VRAMFLOW_DEVICE_MEMORY_MIB, as NVML
would report it) has room for both models' grants they hold it side by side; when it has room
for only one at a time, they take turns.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.fixtures.models import build_tiny_model
from tests.support.servers import REPO_ROOT, clean_env

pytestmark = pytest.mark.slow
PAGES = 12


@pytest.fixture(scope="module")
def two_models(tiny_model_dir, tmp_path_factory) -> list[Path]:
    bigger = build_tiny_model(tmp_path_factory.mktemp("bigger-model"), hidden=96, layers=4)
    return [tiny_model_dir, bigger]


def needs(models: list[Path], env: dict[str, str]) -> list[int]:
    """Each model's grant in MiB, as the engine computes it under `env`."""
    from vramflow import models as loading
    from vramflow.config import Settings
    from vramflow.tasks.engine_host import Grants

    settings = Settings(**{k[9:].lower(): v for k, v in env.items() if k.startswith("VRAMFLOW_")})
    grants = Grants(settings, "cpu")
    return [grants.need(loading.load_model(str(m), settings.model_cache_dir)) for m in models]


def hold_intervals(models: list[Path], env: dict[str, str], folder: Path) -> list[dict]:
    """Start an engine process per model, let them go at once, return their holds."""
    folder.mkdir()
    go, out = folder / "go", folder / "holds.jsonl"
    processes = []
    for n, model in enumerate(models):
        ready = folder / f"ready-{n}"
        command = [sys.executable, "-m", "tests.support.engine_worker", str(model)]
        command += [
            "--pages",
            str(PAGES),
            "--out",
            str(out),
            "--ready",
            str(ready),
            "--go",
            str(go),
        ]
        log = open(folder / f"worker-{n}.log", "wb")  # noqa: SIM115 - closed below
        processes.append(
            (
                subprocess.Popen(
                    command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                ),
                ready,
                log,
            )
        )
    deadline = time.monotonic() + 180
    while not all(ready.exists() for _, ready, _ in processes):
        assert time.monotonic() < deadline and all(p.poll() is None for p, _, _ in processes)
        time.sleep(0.05)
    go.touch()
    for process, _, log in processes:
        assert process.wait(timeout=300) == 0, (folder / "worker-0.log").read_text()[-3000:]
        log.close()
    return [json.loads(line) for line in out.read_text().splitlines()]


def overlapping(holds: list[dict]) -> bool:
    by_pid: dict[int, list[dict]] = {}
    for hold in holds:
        by_pid.setdefault(hold["pid"], []).append(hold)
    a, b = by_pid.values()
    return any(x["start"] < y["end"] and y["start"] < x["end"] for x in a for y in b)


def test_models_whose_grants_fit_hold_the_device_side_by_side_and_others_take_turns(
    prefect_server, two_models, tmp_path
):
    base = {
        **prefect_server.env,
        "VRAMFLOW_HOME": str(tmp_path / "home"),
        "VRAMFLOW_ADMISSION": "memory",
        "VRAMFLOW_MEMORY_MARGIN_MIB": "0",
        "VRAMFLOW_MAX_NEW_TOKENS": "64",
        "VRAMFLOW_BATCH_SIZE": "2",
    }
    small, big = needs(two_models, base)
    assert 0 < small < big  # a grant follows the model's size
    for room, side_by_side in ((small + big, True), (big + small - 1, False)):
        env = clean_env(
            **base,
            VRAMFLOW_DEVICE_MEMORY_MIB=str(room),
            VRAMFLOW_SLOT_NAME_TEMPLATE=f"vramflow-test-{uuid.uuid4().hex[:8]}-{{device}}",
        )
        holds = hold_intervals(two_models, env, tmp_path / f"room-{room}")
        assert {h["occupied"] for h in holds} == {small, big}
        assert sum(h["pages"] for h in holds) == 2 * PAGES
        assert overlapping(holds) == side_by_side, holds


def test_a_process_has_one_engine_per_admission_setting():
    """An engine built for one-holder admission must not serve settings asking for memory
    admission (or another device size): each gets its own."""
    from vramflow.config import Settings
    from vramflow.tasks.engine_host import engine_for

    holders = Settings(device="cpu", admission="holders")
    memory = Settings(device="cpu", admission="memory", device_memory_mib=4096)
    smaller = Settings(device="cpu", admission="memory", device_memory_mib=2048)
    assert engine_for(holders) is engine_for(Settings(device="cpu", admission="holders"))
    assert len({id(engine_for(s)) for s in (holders, memory, smaller)}) == 3
