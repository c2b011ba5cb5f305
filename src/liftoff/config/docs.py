"""Render the configuration reference (docs/configuration.md tables) from the models, the single source."""

from __future__ import annotations

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from liftoff.config.loader import env_name
from liftoff.config.models import AppConfig, ReaderConfig


def _default(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        return "(computed)" if name != "consumer_group" else "`primary`"
    value = field.default
    if value is None or value is PydanticUndefined:
        return "-"
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def render_table(model: type[BaseModel]) -> str:
    """A markdown table of a config model: key, environment variable, default, meaning."""
    rows = ["| key | environment | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | `{env_name(name)}` | {_default(model, name)} | {description} |")
    return "\n".join(rows)


def render() -> str:
    """Both tables, as embedded in docs/configuration.md."""
    return (
        "### server_config\n\n"
        + render_table(AppConfig)
        + "\n\n### readers_config.&lt;reader_id&gt;\n\n"
        + render_table(ReaderConfig)
        + "\n"
    )


if __name__ == "__main__":
    print(render())  # noqa: T201
