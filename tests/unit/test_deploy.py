"""The Kubernetes manifests (deploy/kubernetes): every secret comes from the Secret ``liftoff-secrets``, nothing
secret is written in them, and the example Secret's placeholders cannot be used as keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from liftoff.config.access import check_key

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def documents() -> dict[str, list[dict[str, Any]]]:
    return {path.name: list(yaml.safe_load_all(path.read_text())) for path in sorted(DEPLOY.glob("*.yaml"))}


def containers(name: str) -> list[dict[str, Any]]:
    (deployment,) = [doc for doc in documents()[name] if doc["kind"] == "Deployment"]
    found: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return found


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def test_no_manifest_that_kubectl_applies_holds_a_secret() -> None:
    for name, docs in documents().items():
        assert all(doc["kind"] != "Secret" for doc in docs), name
        assert "redis://redis:" not in (DEPLOY / name).read_text(), name  # a broker URL without the password


@pytest.mark.parametrize("name", ["gateway.yaml", "reader-smollm.yaml", "reader-embed.yaml", "redis.yaml"])
def test_redis_password_comes_from_the_secret(name: str) -> None:
    (container,) = containers(name)
    env = env_of(container)
    assert env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "liftoff-secrets", "key": "redis-password"}}
    if name != "redis.yaml":
        assert env["TAKEOFF_BROKER"] == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
        assert "--broker" not in container["command"]


def test_the_gateways_keys_come_from_files_of_the_secret() -> None:
    (container,) = containers("gateway.yaml")
    env = env_of(container)
    assert env["TAKEOFF_API_KEYS_FILE"] == "/etc/liftoff/api-keys"
    assert env["TAKEOFF_MANAGEMENT_API_KEYS_FILE"] == "/etc/liftoff/management-keys"
    assert env["TAKEOFF_MANAGEMENT_HOST"] == "0.0.0.0"  # allowed: it has keys
    (deployment,) = [doc for doc in documents()["gateway.yaml"] if doc["kind"] == "Deployment"]
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    assert volume["secret"]["secretName"] == "liftoff-secrets"


def test_the_example_secrets_placeholders_are_refused_as_keys() -> None:
    secret = yaml.safe_load((DEPLOY / "secret.yaml.example").read_text())
    assert secret["metadata"]["name"] == "liftoff-secrets"
    for key in ("api-keys", "management-keys"):
        with pytest.raises(ValueError, match="without spaces"):
            check_key(secret["stringData"][key], key)
