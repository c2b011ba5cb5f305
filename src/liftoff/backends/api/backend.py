"""The API backend (``device: api``): a reader that forwards to an OpenAI-compatible server.

The upstream may be a hosted API (OpenAI's, the default ``api_base``) or any engine that speaks OpenAI's API on
another machine (vLLM, SGLang, llama-server, another Liftoff): the reader puts it behind Liftoff's surfaces,
consumer groups, management and metrics. Generation becomes a streamed ``/chat/completions`` (turns, or a prompt
that wants the chat template) or ``/completions`` (a plain prompt) request, relayed chunk by chunk; embeddings
become ``/embeddings``; tokenize, detokenize and chat templates go to the upstream's own routes where it has them
(llama-server, vLLM) and are a 400 elsewhere. The reader's capacity is ``max_concurrency``.

The key comes from ``access_token``, else the file ``access_token_file``, else ``TAKEOFF_ACCESS_TOKEN``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import httpx

from liftoff.backends.api.client import Upstream, UpstreamSettings
from liftoff.backends.api.dialects import (
    OPENAI_BASE,
    TRUNCATE,
    Dialect,
    detect_dialect,
    dialect_named,
    generation_call,
    listed_models,
)
from liftoff.backends.api.wire import client_error, embedding_rows, error_message, parse_event, share_tokens
from liftoff.backends.base import COMMON_OPTIONS, BackendContext, ProgressCallback, RemoteBackend, StepOutput
from liftoff.config.models import ReaderConfig
from liftoff.core.errors import InvalidRequestError, NotSupportedError, UpstreamError, UpstreamUnavailableError
from liftoff.core.types import FinishReason, GenerationParams, ModelType

logger = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 32
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_HEALTH_INTERVAL_S = 10.0


class ApiBackend(RemoteBackend):
    """Forwards generation, embeddings and tokenizer services to an OpenAI-compatible upstream."""

    name = "api"
    honoured_options = COMMON_OPTIONS | {
        "access_token", "access_token_file", "api_base", "api_timeout_s", "max_concurrency", "api_headers",
    }  # fmt: skip
    backend_options = frozenset({"dialect", "chat_only", "health_interval_s"})

    def __init__(self, config: ReaderConfig, context: BackendContext | None = None) -> None:
        super().__init__(config, context)
        self.capacity = config.max_concurrency or config.max_batch_size or DEFAULT_CONCURRENCY
        self.base = config.api_base or OPENAI_BASE
        forced = str(self.options.get("dialect", "auto"))
        self.dialect: Dialect | None = None if forced == "auto" else dialect_named(forced)
        self.chat_only = bool(self.options.get("chat_only", self.base == OPENAI_BASE))
        self._upstream: Upstream | None = None
        self._load_notes: list[str] = []

    @property
    def model_type(self) -> ModelType:
        return ModelType.API

    @property
    def upstream(self) -> Upstream:
        """The upstream connection (made at load)."""
        if self._upstream is None:
            raise RuntimeError("the API backend is not loaded")
        return self._upstream

    # ---- loading ------------------------------------------------------------------------------------------------

    def load(self, progress: ProgressCallback) -> None:
        """Read the key and look at the upstream once: a refused key fails the load; an upstream that does not
        answer yet leaves the reader live but unhealthy until it does (a GPU engine may still be loading)."""
        settings = UpstreamSettings(
            base=self.base,
            key=self._key(),
            headers=dict(self.config.api_headers or {}),
            timeout_s=self.config.api_timeout_s or DEFAULT_TIMEOUT_S,
            connections=self.capacity,
            health_interval_s=float(self.options.get("health_interval_s", DEFAULT_HEALTH_INTERVAL_S)),
        )
        upstream = Upstream(settings)
        upstream.on_up = self._on_models
        self._upstream = upstream
        try:
            self._on_models(upstream.probe_sync())
        except UpstreamUnavailableError as exc:
            logger.warning("upstream %s does not answer yet: %s", upstream.label, exc.message)
            upstream.mark_down(exc.message)
        except UpstreamError as exc:
            raise RuntimeError(exc.message) from None
        progress(1.0)

    def _key(self) -> str | None:
        if self.config.access_token:
            return self.config.access_token
        if self.config.access_token_file:
            path = Path(self.config.access_token_file).expanduser()
            try:
                return path.read_text().strip() or None
            except OSError as exc:
                raise RuntimeError(f"cannot read access_token_file {str(path)!r}: {exc.strerror}") from None
        return os.environ.get("TAKEOFF_ACCESS_TOKEN") or None

    def _on_models(self, answer: Any) -> None:
        """The upstream's ``GET /models``: find its dialect (once), and say if our model is not among its models."""
        if self.dialect is None:
            self.dialect = detect_dialect(answer, self.config.model_name)
            logger.info("upstream %s speaks the %s dialect", self.upstream.label, self.dialect.name)
        # llama-server drops some kept-alive connections after a stream (about 1 request in 10 then finds its
        # connection closed): a connection per request there, which costs little on the networks it runs on.
        self.upstream.fresh_connections = self.dialect.name == "llama-server"
        models = listed_models(answer)
        note = f"model_name {self.config.model_name!r} is not among the upstream's models ({', '.join(models)})"
        if models and self.config.model_name not in models and note not in self._load_notes:
            self._load_notes.append(note)

    def notes(self) -> list[str]:
        return super().notes() + self._load_notes

    # ---- the relay's loop ---------------------------------------------------------------------------------------

    async def open(self) -> None:
        await self.upstream.open()

    async def aclose(self) -> None:
        await self.upstream.close()

    async def watch(self) -> None:
        await self.upstream.watch()

    def health(self) -> str:
        return self._upstream.unhealthy if self._upstream is not None else ""

    def _dialect(self) -> Dialect:
        return self.dialect or dialect_named("openai")  # not detected yet: only what every server takes

    async def generate(self, request_id: str, text: str, params: GenerationParams) -> AsyncGenerator[StepOutput, None]:
        """Stream one generation: an output per upstream chunk with text, then one with the finish reason."""
        upstream = self.upstream
        call = generation_call(self.config.model_name, text, params, self._dialect(), upstream.label,
                               chat_only=self.chat_only)  # fmt: skip
        finish: FinishReason | None = None
        prompt_tokens = completion_tokens = 0
        chunks = 0
        async with upstream.stream(call.path, call.body) as events:
            async for data in events:
                chunk = parse_event(data, chat=call.chat)
                if chunk is None:
                    break
                prompt_tokens = chunk.prompt_tokens or prompt_tokens
                completion_tokens = chunk.completion_tokens or completion_tokens
                if chunk.text:
                    chunks += 1
                    yield StepOutput(request_id, text=chunk.text, n_tokens=1, prompt_tokens=prompt_tokens,
                                     completion_tokens=completion_tokens or chunks)  # fmt: skip
                finish = chunk.finish or finish
        if finish is None:
            raise UpstreamUnavailableError(f"{upstream.label} ended the stream before the generation finished")
        yield StepOutput(request_id, finish_reason=finish, prompt_tokens=prompt_tokens,
                         completion_tokens=completion_tokens or chunks)  # fmt: skip

    async def embed(self, inputs: list[str], truncate: bool | None) -> tuple[list[bytes], list[int]]:
        """One upstream ``/embeddings`` call for every input of a request."""
        body: dict[str, Any] = {"model": self.config.model_name, "input": inputs, "encoding_format": "float"}
        if truncate:
            self._dialect().require(TRUNCATE, self.upstream.label)
            body["truncate_prompt_tokens"] = -1  # vLLM: cut to the model's length
        answer = await self.upstream.post_json("/embeddings", body)
        rows = embedding_rows(answer, len(inputs))
        usage = answer.get("usage") if isinstance(answer, dict) else None
        total = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        return rows, share_tokens(total if isinstance(total, int) else 0, inputs)

    # ---- tokenizer services (the reader's service threads) ------------------------------------------------------

    def _tokenizer_dialect(self, what: str) -> Dialect:
        dialect = self._dialect()
        if not dialect.tokenizer:
            raise NotSupportedError(
                f"{what} is not offered by this API reader's upstream ({self.upstream.label}, {dialect.name} "
                "dialect); the llama-server and vLLM dialects have it"
            )
        return dialect

    def tokenize(self, text: str, *, use_chat_template: bool = False, add_special_tokens: bool = True) -> list[str]:
        dialect = self._tokenizer_dialect("tokenizing")
        if dialect.name == "vllm":
            body: dict[str, Any] = {"model": self.config.model_name, "return_token_strs": True}
            if use_chat_template:
                body.update(messages=[{"role": "user", "content": text}], add_generation_prompt=True)
            else:
                body.update(prompt=text, add_special_tokens=add_special_tokens)
            answer = self._post_root("/tokenize", body)
            return [str(piece) for piece in answer.get("token_strs") or answer.get("tokens") or []]
        if use_chat_template:
            text = self.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        body = {"content": text, "add_special": add_special_tokens and not use_chat_template, "with_pieces": True}
        answer = self._post_root("/tokenize", body)
        return [_piece(token) for token in answer.get("tokens") or []]

    def detokenize(self, tokens: list[int] | list[str], *, skip_special_tokens: bool = True) -> str:
        dialect = self._tokenizer_dialect("detokenizing")
        if not all(isinstance(token, int) for token in tokens):
            raise InvalidRequestError("an API reader detokenizes token ids only, not token strings", param="tokens")
        if dialect.name == "vllm":
            return str(self._post_root("/detokenize", {"model": self.config.model_name, "tokens": tokens})["prompt"])
        return str(self._post_root("/detokenize", {"tokens": tokens})["content"])

    def apply_chat_template(self, conversation: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        dialect = self._dialect()
        if not dialect.chat_template:
            raise NotSupportedError(
                f"chat templates are not offered by this API reader's upstream ({self.upstream.label}, "
                f"{dialect.name} dialect); the llama-server dialect has them"
            )
        body = {"messages": conversation, "add_generation_prompt": add_generation_prompt}
        return str(self._post_root("/apply-template", body)["prompt"])

    def _post_root(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to a route at the upstream's root, from a service thread (one attempt: these are quick)."""
        upstream = self.upstream
        settings = upstream.settings
        try:
            with upstream.sync_client(settings.timeout_s) as client:
                response = client.post(settings.root + path, json=body)
        except httpx.HTTPError as exc:
            raise UpstreamUnavailableError(f"{upstream.label} cannot be reached ({type(exc).__name__})") from None
        if response.status_code >= 400:
            message = upstream.redact(error_message(response.content))
            if response.status_code >= 500 or response.status_code == 429:
                raise UpstreamUnavailableError(f"{upstream.label} answered {response.status_code}: {message}")
            raise client_error(response.status_code, message, upstream.label)
        answer = response.json()
        if not isinstance(answer, dict):
            raise UpstreamError(f"{upstream.label} answered {path} with something unexpected")
        return answer


def _piece(token: Any) -> str:
    """llama-server's ``{"id", "piece"}``: the piece is text, or a list of bytes when it is not valid UTF-8."""
    piece = token.get("piece") if isinstance(token, dict) else token
    if isinstance(piece, list):
        return bytes(piece).decode("utf-8", errors="replace")
    return str(piece)
