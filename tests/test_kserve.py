"""deploy/kserve/inferenceservice.yaml is an InferenceService that KServe accepts and that
starts clipserve as configured: checked against KServe's own schema for the resource (the
CRD's OpenAPI schema, vendored in tests/data with its source named: the kserve package pins
protobuf<7, which this project cannot install beside its stubs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from clipserve_server.config_loaders import load_config

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
REST_MANIFEST = ROOT / "deploy" / "kserve" / "inferenceservice-rest.yaml"  # the HTTP face (docs/http/)
SCHEMA = Path(__file__).resolve().parent / "data" / "kserve_inferenceservice_v1beta1.schema.json"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text())["schema"]


@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def rest_service() -> dict[str, Any]:
    return yaml.safe_load(REST_MANIFEST.read_text())


def unknown_fields(document: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Keys the schema does not define. The API server prunes them silently (a CRD's schema
    does not forbid them), so a misspelt field would be dropped without a word: find them here."""
    found: list[str] = []
    if isinstance(document, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key, value in document.items():
            if key in schema["properties"]:
                found += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
            elif "additionalProperties" not in schema:
                found.append(f"{path}.{key}")
    elif isinstance(document, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(document):
            found += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return found


def test_the_inferenceservice_is_valid_against_kserves_schema(service, schema):
    """Every field has KServe's type and required fields (jsonschema), and none is unknown."""
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    jsonschema.validate(service, schema)
    assert unknown_fields(service, schema) == []


def test_the_schema_check_catches_a_misspelt_or_mistyped_field(service, schema):
    """The check above is not vacuous: a field in the wrong place and a wrong type both fail."""
    container = service["spec"]["predictor"]["containers"][0]
    misspelt = {
        **service,
        "spec": {"predictor": {**service["spec"]["predictor"], "containers": [{**container, "readinesProbe": {}}]}},
    }
    assert unknown_fields(misspelt, schema) == [".spec.predictor.containers[0].readinesProbe"]
    mistyped = {**service, "spec": {"predictor": {**service["spec"]["predictor"], "minReplicas": "one"}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(mistyped, schema)


def test_the_predictor_serves_grpc_on_a_gpu_and_probes_the_health_service(service):
    """Knative routes gRPC to a port named h2c; the probes ask clipserve's health service on that
    port; one GPU; the arguments are a command line clipserve serve accepts, on that port."""
    container = service["spec"]["predictor"]["containers"][0]
    (port,) = container["ports"]
    assert port["name"] == "h2c"
    config = load_config(container["args"], environ={e["name"]: e["value"] for e in container["env"]})
    assert config.port == port["containerPort"] and config.v2_alias == "clip"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port["containerPort"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_the_rest_inferenceservice_is_valid_and_serves_the_http_face(rest_service, schema):
    """The REST variant: valid as the gRPC one; Knative's HTTP/1.1 port (http1) is the one
    --http-port gives, and the probes ask the protocol's REST readiness there."""
    jsonschema.validate(rest_service, schema)
    assert unknown_fields(rest_service, schema) == []
    container = rest_service["spec"]["predictor"]["containers"][0]
    (port,) = container["ports"]
    assert port["name"] == "http1"
    config = load_config(container["args"], environ={e["name"]: e["value"] for e in container["env"]})
    assert config.resolved_http_port == port["containerPort"] and config.v2_alias == "clip"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/v2/health/ready", "port": port["containerPort"]}
