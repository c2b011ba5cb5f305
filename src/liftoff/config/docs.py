"""Render the configuration reference (docs/configuration.md tables) from the models, the single source."""

from __future__ import annotations

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from liftoff.config.access import AccessSettings
from liftoff.config.loader import env_name
from liftoff.config.models import AppConfig, ReaderConfig


def _default(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        return "(computed)" if name != "consumer_group" else "`primary`"
    value = field.default
    if value is None or value is PydanticUndefined or value == ():
        return "-"
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def render_table(model: type[BaseModel], names: list[str] | None = None) -> str:
    """A markdown table of a config model (or of its fields ``names``): key, environment variable, default,
    meaning."""
    rows = ["| key | environment | default | meaning |", "|---|---|---|---|"]
    for name in names if names is not None else list(model.model_fields):
        field = model.model_fields[name]
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | `{env_name(name)}` | {_default(model, name)} | {description} |")
    return "\n".join(rows)


def render() -> str:
    """The tables, as embedded in docs/configuration.md: server_config (its access keys apart), readers_config."""
    own = [name for name in AppConfig.model_fields if name not in AccessSettings.model_fields]
    return (
        "### server_config\n\n"
        + render_table(AppConfig, own)
        + "\n\n### server_config: access and limits (docs/security.md)\n\n"
        + render_table(AccessSettings)
        + "\n\n### readers_config.&lt;reader_id&gt;\n\n"
        + render_table(ReaderConfig)
        + "\n"
    )


if __name__ == "__main__":
    print(render())  # noqa: T201
