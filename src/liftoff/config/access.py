"""Who may do what: the keys, the reader secret, the bind hosts and the limits of the management API.

``AccessSettings`` holds the ``server_config`` keys of docs/security.md; ``AppConfig`` inherits them. Takeoff had
none of these (it left authentication to an ingress), so every one is a Liftoff extension, and the inference
surfaces stay open unless ``api_keys`` is set, for drop-in compatibility. What is safe by default is where the
management API and the internal port listen (loopback), and what a caller of the management API may start.

Secrets (keys and the reader secret) are kept out of ``repr``, out of ``/status`` and out of error messages.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

MIN_KEY_LENGTH = 16
SECRET_FIELDS = frozenset({"api_keys", "management_api_keys", "reader_secret"})
# secret field → the field naming a file that holds more of it (a mounted Kubernetes Secret)
SECRET_FILES = {"api_keys": "api_keys_file", "management_api_keys": "management_api_keys_file",
                "reader_secret": "reader_secret_file"}  # fmt: skip
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
_KEY_ADVICE = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def split_list(value: Any) -> Any:
    """A comma-separated string (an environment variable) or a list, as a tuple of stripped, non-empty items."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, list | tuple):
        return tuple(str(item).strip() for item in value if str(item).strip())
    return value


def check_key(key: str, name: str) -> str:
    """A key long enough not to be guessed; the message never shows it."""
    if len(key) < MIN_KEY_LENGTH or any(char.isspace() for char in key):
        raise ValueError(f"each of {name} must be at least {MIN_KEY_LENGTH} characters without spaces; {_KEY_ADVICE}")
    return key


class AccessSettings(BaseModel):
    """The ``server_config`` keys about access: keys, bind hosts, host names, and management limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_keys: tuple[str, ...] = Field(
        (),
        repr=False,
        description="[Liftoff] Keys the inference surfaces (port, vertex_port, openai_port, snowflake_port, "
        "sagemaker_port) require, comma-separated; none: they are open, as Takeoff's. A client sends one as "
        "'Authorization: Bearer KEY', 'X-API-Key: KEY' or HTTP Basic with the key as password.",
    )
    api_keys_file: str | None = Field(
        None, description="[Liftoff] A file of more api_keys, one per line (a mounted Kubernetes Secret)."
    )
    management_api_keys: tuple[str, ...] = Field(
        (), repr=False, description="[Liftoff] Keys the management port requires, comma-separated (as api_keys)."
    )
    management_api_keys_file: str | None = Field(
        None, description="[Liftoff] A file of more management_api_keys, one per line."
    )
    reader_secret: str | None = Field(
        None,
        repr=False,
        description="[Liftoff] The secret a reader must present to join over the internal port; readers this "
        "gateway starts are given it, headless ones read TAKEOFF_READER_SECRET or --reader-secret-file.",
    )
    reader_secret_file: str | None = Field(None, description="[Liftoff] A file holding reader_secret.")
    public_metrics: bool = Field(
        False, description="[Liftoff] Serve /metrics without a management key (for scrapers that cannot send one)."
    )
    management_host: str = Field(
        "127.0.0.1",
        description="[Liftoff] Address the management port binds to; beyond loopback it needs management_api_keys "
        "(or allow_insecure_management).",
    )
    internal_host: str = Field(
        "127.0.0.1",
        description="[Liftoff] Address the internal port (readers) binds to; beyond loopback it needs reader_secret "
        "(or allow_insecure_internal).",
    )
    allow_insecure_management: bool = Field(
        False, description="[Liftoff] Let the management port listen beyond loopback without keys (warned at start)."
    )
    allow_insecure_internal: bool = Field(
        False,
        description="[Liftoff] Let the internal port listen beyond loopback without reader_secret (warned at start).",
    )
    allowed_hosts: tuple[str, ...] = Field(
        (),
        description="[Liftoff] Host names requests may be addressed to besides localhost, this machine's names and "
        "the bind hosts (IP addresses always pass): 'name', '.example.com' (it and its subdomains) or '*' (any). "
        "Others get 400: this stops DNS rebinding.",
    )
    max_readers: int = Field(
        16, ge=1, le=4096, description="[Liftoff] Readers this gateway may run at once; POST /reader beyond is a 400."
    )
    max_reader_batch_size: int = Field(
        256, ge=1, le=1024, description="[Liftoff] Largest max_batch_size a reader created with POST /reader may ask."
    )
    max_reader_sequence_length: int = Field(
        131_072,
        ge=1,
        le=1 << 20,
        description="[Liftoff] Largest max_sequence_length (and prefill_chunk_size) a reader created with POST "
        "/reader may ask.",
    )
    allowed_models: tuple[str, ...] = Field(
        (),
        description="[Liftoff] Hugging Face ids POST /reader may name, as patterns ('Qwen/*'), comma-separated; "
        "bundled aliases, echo and models under repository_path are always allowed.",
    )
    allowed_api_bases: tuple[str, ...] = Field(
        (),
        description="[Liftoff] Upstream base URLs an API reader (device api) created with POST /reader may use, "
        "comma-separated, e.g. 'http://gpu-host:8000/v1'; fnmatch patterns are allowed, but a * matches dots and "
        "slashes too (so 'http://gpu-*' admits any host starting so); none by default (such readers are refused).",
    )
    allow_downloads: bool = Field(
        False,
        description="[Liftoff] Let readers created with POST /reader download allowed_models from the hub; "
        "otherwise only models already in repository_path.",
    )
    dead_reader_retention_s: float = Field(
        3600.0,
        gt=0,
        description="[Liftoff] A reader this gateway did not start that stays dead this long is forgotten.",
    )
    reader_load_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="[Liftoff] A reader this gateway did not start that is still loading after this long is "
        "stopped (then forgotten as a dead one).",
    )

    @field_validator(
        "api_keys", "management_api_keys", "allowed_hosts", "allowed_models", "allowed_api_bases", mode="before"
    )
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("api_keys", "management_api_keys")
    @classmethod
    def _check_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_key(key, "the keys") for key in value)

    @field_validator("reader_secret")
    @classmethod
    def _check_secret(cls, value: str | None) -> str | None:
        return None if value is None or not value.strip() else check_key(value.strip(), "reader_secret")

    def exposure(self) -> tuple[list[str], list[str]]:
        """Problems that stop the start (a port open beyond loopback without its key) and warnings to log."""
        errors: list[str] = []
        warnings: list[str] = []
        checks = (
            ("management_host", "management_api_keys", bool(self.management_api_keys), self.allow_insecure_management,
             "allow_insecure_management", "anyone who reaches it can start and stop readers"),
            ("internal_host", "reader_secret", self.reader_secret is not None, self.allow_insecure_internal,
             "allow_insecure_internal", "anyone who reaches it can join as a reader and read prompts"),
        )  # fmt: skip
        for host_key, key_name, has_key, allowed, switch, risk in checks:
            host = getattr(self, host_key)
            if has_key or is_loopback(host):
                continue
            message = f"{host_key} is {host!r}, beyond loopback, and {key_name} is not set: {risk}"
            if allowed:
                warnings.append(f"{message} ({switch} is true)")
            else:
                errors.append(f"{message}. Set {key_name} (or {key_name}_file), bind {host_key} to 127.0.0.1, "
                              f"or set {switch}: true")  # fmt: skip
        return errors, warnings


def with_key_files(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (server_config values) with the keys of every ``*_file`` added to its secret; errors name the file
    (never its content)."""
    data = dict(data)
    for secret, file_key in SECRET_FILES.items():
        path = data.get(file_key)
        if not path:
            continue
        try:
            lines = Path(str(path)).expanduser().read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"{file_key}: cannot read {path}: {exc.strerror}") from None
        values = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not values:
            raise ValueError(f"{file_key}: {path} holds no key")
        if secret == "reader_secret":
            if len(values) != 1:
                raise ValueError(f"{file_key}: {path} must hold one secret, on one line")
            data[secret] = values[0]
        else:
            data[secret] = (*split_list(data.get(secret)), *values)
    return data


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` is reachable from this machine only."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    if name in WILDCARD_HOSTS:
        return False
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def own_names(bind_hosts: Iterable[str]) -> frozenset[str]:
    """The names requests may be addressed to by default: localhost, this machine's names, and the bind hosts."""
    names = {"localhost", socket.gethostname()}
    with contextlib.suppress(OSError):
        names.add(socket.getfqdn())
    names.update(host for host in bind_hosts if host not in WILDCARD_HOSTS)
    return frozenset(name.strip("[]").lower().rstrip(".") for name in names if name)


def redact_url(url: str) -> str:
    """``url`` with its password (``redis://:pw@host``) replaced by ``***``, for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an invalid URL)"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}" if user else f":***@{host}"))
