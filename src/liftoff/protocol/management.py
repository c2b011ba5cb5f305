"""Wire schemas of the management API (port 3001): ``/status``, ``/reader_groups``, ``/reader``, ``/config``,
``/reader/{id}/loras``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ReaderInfoModel(BaseModel):
    """``ReaderInfo`` of the management ``/status``."""

    consumer_groups: list[str]
    consumer_name: str
    device: str
    model_name: str
    model_type: str
    pids: list[int]
    loras: str | None = Field(None, description="Its LoRA adapters' names, comma-separated (absent without).")


class LastHeartbeat(BaseModel):
    """A reader's last heartbeat: epoch milliseconds, and the reader's heartbeat period in milliseconds."""

    heartbeat_timestamp: int
    heartbeat_wait_interval: int


class StatusConfig(BaseModel):
    """``config`` of the management ``/status``."""

    allow_remote_images: bool
    body_size_limit_bytes: int
    echo: bool
    enable_metrics: bool
    heartbeat_check_interval: int
    internal_port: int
    management_port: int
    max_prompt_string_bytes: int
    max_user_batch_size: int
    openai_port: int
    port: int
    reader_message_timeout_ms: int
    repository_path: str
    reserved_consumers: str
    snowflake_port: int
    vertex_port: int


class StatusBody(BaseModel):
    """``status`` of the management ``/status``."""

    dead_readers: dict[str, ReaderInfoModel]
    last_heartbeat: dict[str, LastHeartbeat]
    live_readers: dict[str, ReaderInfoModel]
    loading_readers: dict[str, ReaderInfoModel]
    reserved_consumers: list[str]


class StatusResponse(BaseModel):
    """The management ``GET /status`` (takeoff-spec §2.2.1)."""

    config: StatusConfig
    status: StatusBody | None


class ReaderGroupEntry(BaseModel):
    """One reader in ``GET /reader_groups``."""

    reader_id: str
    device: str
    model_name: str
    model_type: str
    pids: list[int]
    loras: str | None = Field(None, description="Its LoRA adapters' names, comma-separated (absent without).")
    ready: bool = Field(..., description="Whether the reader is live.")


class CreatedReader(BaseModel):
    """Answer of ``POST /reader``."""

    reader_id: str


class AddLoraRequest(BaseModel):
    """Body of ``POST /reader/{reader_id}/loras`` (a Liftoff addition)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(..., min_length=1, max_length=128, description="The adapter's name: what lora_id picks.")
    path: str = Field(
        ...,
        min_length=1,
        max_length=4096,
        description="Where it is, as an entry of loras: a PEFT directory (under repository_path for readers this API "
        "may change), a path relative to repository_path, or a Hugging Face id org/name.",
    )


class ReaderLoras(BaseModel):
    """Answer of ``POST /reader/{reader_id}/loras`` and ``DELETE /reader/{reader_id}/loras/{name}``."""

    reader_id: str
    loras: list[str] = Field(..., description="The reader's adapters after the change, in order.")
