"""Every parameter of every deployment has a description in the UI's run form.

The form shows the descriptions of the deployment's parameter schema, which Prefect takes from
the flow's docstring ("Args:" section, Google style). Both ways of deploying are checked:
`vramflow serve` builds the schema from the imported flow, `prefect deploy` from the flow it
loads by the module path that prefect.yaml names as the entrypoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINTS = [
    d["entrypoint"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
]


def _undescribed(schema: dict) -> list[str]:
    return [
        name
        for name, field in schema["properties"].items()
        if not (field.get("description") or "").strip()
    ]


def test_served_deployments_describe_every_parameter():
    from vramflow.flows.deployments import deployments

    served = deployments()
    assert {d.name for d in served} == {"process-pdf", "sweep-inbox", "retry-failed"}
    for deployment in served:
        schema = deployment._parameter_openapi_schema.model_dump()
        assert schema["properties"], deployment.name
        assert _undescribed(schema) == [], f"{deployment.name}: parameters without a description"


@pytest.mark.parametrize("entrypoint", ENTRYPOINTS)
def test_prefect_yaml_deployments_describe_every_parameter(entrypoint, monkeypatch):
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    monkeypatch.chdir(REPO)
    # What `prefect deploy` does with a module-path entrypoint.
    schema = parameter_schema(load_flow_from_entrypoint(entrypoint)).model_dump()
    assert schema["properties"], entrypoint
    assert _undescribed(schema) == [], f"{entrypoint}: parameters without a description"
