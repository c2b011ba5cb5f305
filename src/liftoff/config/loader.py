"""Load the configuration: defaults < ``config.yaml`` < ``TAKEOFF_*`` environment < command-line flags.

This is the only place that reads ``os.environ`` for served configuration. Errors name the field, the value and
where it came from, and say how to fix the problem.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from liftoff.config.access import SECRET_FIELDS, with_key_files
from liftoff.config.manifest import ManifestError, read_manifest
from liftoff.config.models import LEGACY_SERVER_KEYS, AppConfig, ReaderConfig

logger = logging.getLogger(__name__)

_M = TypeVar("_M", bound=BaseModel)

ENV_PREFIX = "TAKEOFF_"
CONTAINER_CONFIG_PATH = Path("/code/config.yaml")


class ConfigError(Exception):
    """The configuration is invalid; the message names the field and the fix."""


@dataclass(frozen=True)
class LoadedConfig:
    """The merged configuration, and the manifest file it came from (if any)."""

    server: AppConfig
    readers: dict[str, ReaderConfig]
    path: Path | None = None
    warnings: list[str] = field(default_factory=list)


def env_name(field_name: str) -> str:
    """The environment variable of a config field: ``TAKEOFF_`` + the upper-cased name."""
    return ENV_PREFIX + field_name.upper()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def looks_secret(name: str) -> bool:
    """Whether a key's value must not be shown: a secret, or a key named like one (a misspelt ``api_key``)."""
    return name in SECRET_FIELDS or any(word in name.lower() for word in ("key", "secret", "password", "token"))


def _format_errors(exc: ValidationError, section: str, sources: Mapping[str, str]) -> str:
    lines = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        where = sources.get(str(error["loc"][0]), "") if error["loc"] else ""
        shown = f"{section}.{loc}" if loc else section
        got = "a secret" if error["loc"] and looks_secret(str(error["loc"][0])) else repr(error["input"])
        value = f" (got {got}{' from ' + where if where else ''})" if loc else ""
        lines.append(f"{shown}: {error['msg']}{value}")
    return "invalid configuration: " + "; ".join(lines)


def _validate(model: type[_M], data: dict[str, Any], section: str, sources: Mapping[str, str]) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, section, sources)) from None


def _env_values(model: type[BaseModel], env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        value = env.get(env_name(name))
        if value is None or value == "":
            continue
        if "dict" in str(info.annotation):
            try:
                values[name] = json.loads(value)
            except ValueError as exc:
                raise ConfigError(f"{env_name(name)} must be a JSON object: {exc}") from None
        else:
            values[name] = value
    return values


def redis_url(env: Mapping[str, str]) -> str:
    """Takeoff's ``TAKEOFF_REDIS_HOST`` and ``TAKEOFF_REDIS_PORT`` (default 6379) as a broker URL."""
    return f"redis://{env['TAKEOFF_REDIS_HOST']}:{env.get('TAKEOFF_REDIS_PORT') or 6379}/0"


def _resolve_path(flag_path: str | None, env: Mapping[str, str]) -> Path | None:
    if flag_path:
        return Path(flag_path)
    if env.get("TAKEOFF_CONFIG_PATH"):
        return Path(env["TAKEOFF_CONFIG_PATH"])
    return CONTAINER_CONFIG_PATH if CONTAINER_CONFIG_PATH.is_file() else None


def _section(manifest: dict[str, Any], key: str, path: Path | None) -> dict[str, Any]:
    value = manifest.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} in {path} must be a mapping, not {type(value).__name__}")
    return value


def _sourced(manifest_values: Mapping[str, Any], env_values: Mapping[str, Any], flags: Mapping[str, Any],
             path: Path | None) -> tuple[dict[str, Any], dict[str, str]]:  # fmt: skip
    """Merge file < environment < flags, remembering where each key's value came from."""
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for kind, values in (("file", manifest_values), ("environment", env_values), ("command line", flags)):
        for key, value in values.items():
            if value is None:
                continue
            data[key] = value
            if kind == "file":
                sources[key] = str(path)
            elif kind == "environment":
                sources[key] = f"environment ({env_name(key)})"
            else:
                sources[key] = f"command line (--{key.replace('_', '-')})"
    return data, sources


# Variables Vertex AI sets in custom containers, used where the TAKEOFF_* variable is not set.
VERTEX_ENV = {
    "vertex_port": "AIP_HTTP_PORT",
    "vertex_health_route": "AIP_HEALTH_ROUTE",
    "vertex_predict_route": "AIP_PREDICT_ROUTE",
}


def _load_server(
    manifest: dict[str, Any], env: Mapping[str, str], flags: Mapping[str, Any], path: Path | None
) -> AppConfig:
    env_values = _env_values(AppConfig, env)
    for key, variable in VERTEX_ENV.items():
        if key not in env_values and env.get(variable):
            env_values[key] = env[variable]
    if "broker" not in env_values and env.get("TAKEOFF_REDIS_HOST"):
        env_values["broker"] = redis_url(env)
    data, sources = _sourced(_section(manifest, "server_config", path), env_values, flags, path)
    if env.get(VERTEX_ENV["vertex_port"]) and "sagemaker_port" not in data:
        # On Vertex AI (which sets AIP_HTTP_PORT, 8080 by default) SageMaker's fixed 8080 is of no use and would
        # collide: its listener takes a free port unless sagemaker_port is set.
        data["sagemaker_port"] = 0
        sources["sagemaker_port"] = f"a free port, as {VERTEX_ENV['vertex_port']} is set (Vertex AI)"
    try:
        data = with_key_files(data)
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: server_config.{exc}") from None
    return _validate(AppConfig, data, "server_config", sources)


_Raw = tuple[dict[str, Any], dict[str, str]]


def _env_reader(env: Mapping[str, str], flags: Mapping[str, Any]) -> tuple[str, _Raw] | None:
    env_values = _env_values(ReaderConfig, env) if env.get(env_name("model_name")) else {}
    data, sources = _sourced({}, env_values, flags, None)
    if "model_name" not in data:
        return None
    data.setdefault("device", "cpu")
    reader_id = env.get("TAKEOFF_READER_ID") or str(uuid.uuid4())
    return reader_id, (data, sources)


def _load_readers(
    manifest: dict[str, Any],
    server: AppConfig,
    env: Mapping[str, str],
    reader_flags: Mapping[str, Any],
    path: Path | None,
) -> dict[str, ReaderConfig]:
    from_file = _section(manifest, "readers_config", path)
    from_env = _env_reader(env, reader_flags)
    if from_file and from_env:
        raise ConfigError(
            f"readers are defined both in {path} (readers_config) and by TAKEOFF_MODEL_NAME or --model-name; "
            "the environment would overwrite the file's readers. Remove readers_config from the file, "
            "or unset TAKEOFF_MODEL_NAME and drop --model-name."
        )
    raw: dict[str, _Raw] = {}
    for reader_id, values in from_file.items():
        if not isinstance(values, dict):
            raise ConfigError(f"readers_config.{reader_id} in {path} must be a mapping of reader options")
        raw[str(reader_id)] = (dict(values), dict.fromkeys(values, str(path)))
    if from_env:
        raw[from_env[0]] = from_env[1]
    suffix = _truthy(env.get("TAKEOFF_ADD_READER_ID_SUFFIX"))
    readers: dict[str, ReaderConfig] = {}
    for reader_id, (values, sources) in raw.items():
        for key in ("max_batch_size", "batch_duration_millis"):
            if values.get(key) is None and getattr(server, key) is not None:
                values[key] = getattr(server, key)
                sources[key] = f"server default ({env_name(key)})"
        config = _validate(ReaderConfig, values, f"readers_config.{reader_id}", sources)
        readers[f"{reader_id}_{uuid.uuid4()}" if suffix else reader_id] = config
    return readers


def load_config(
    *,
    config_path: str | None = None,
    env: Mapping[str, str] | None = None,
    server_flags: Mapping[str, Any] | None = None,
    reader_flags: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """Merge every configuration source; raise :class:`ConfigError` naming the field on any problem."""
    import os

    env = os.environ if env is None else env
    path = _resolve_path(config_path, env)
    try:
        manifest = read_manifest(path) if path is not None else {}
    except ManifestError as exc:
        raise ConfigError(str(exc)) from None
    server = _load_server(manifest, env, server_flags or {}, path)
    readers = _load_readers(manifest, server, env, reader_flags or {}, path)
    warnings = [
        f"server_config.{key} is a Takeoff <= 0.16 setting with no effect: Liftoff always serves every port"
        for key in LEGACY_SERVER_KEYS
        if getattr(server, key) is not None
    ]
    return LoadedConfig(server=server, readers=readers, path=path, warnings=warnings)
