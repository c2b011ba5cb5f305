"""``liftoff.gateway.translate.openai``: OpenAI bodies → request frames, and every refusal names its field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from liftoff.config.models import AppConfig
from liftoff.core.errors import InvalidRequestError, LiftoffError, NotSupportedError
from liftoff.core.types import GenerationParams
from liftoff.gateway.translate.openai import (
    CHAT_MAX_TOKENS,
    COMPLETION_MAX_TOKENS,
    JSON_OBJECT_SCHEMA,
    chat_plan,
    completion_plan,
)
from liftoff.protocol.openai import ChatCompletionRequest, CompletionRequest

CONFIG = AppConfig(max_user_batch_size=6)
USER = [{"role": "user", "content": "Hi there"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "g", "messages": USER, **fields})


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "g", "prompt": "p", **fields})


def test_chat_maps_to_one_frame_with_the_chat_template_and_openai_sampling_defaults() -> None:
    plan = chat_plan(chat(), CONFIG)
    assert plan.n == 1
    [frame] = plan.frames
    assert (frame.consumer_group, frame.text) == ("g", "Hi there")
    assert frame.params == GenerationParams(max_new_tokens=CHAT_MAX_TOKENS, top_k=0, use_chat_template=True)


def test_chat_fields_become_decoding_parameters() -> None:
    body = chat(max_completion_tokens=7, temperature=0.5, top_p=0.9, stop="##", seed=3, ignore_eos=True,
                min_tokens=2, top_k=5, repetition_penalty=1.1)  # fmt: skip
    params = chat_plan(body, CONFIG).frames[0].params
    assert params == GenerationParams(
        max_new_tokens=7, min_new_tokens=2, temperature=0.5, top_k=5, top_p=0.9, repetition_penalty=1.1,
        use_chat_template=True, seed=3, ignore_eos=True, stop=("##",),
    )  # fmt: skip
    assert chat_plan(chat(max_tokens=4), CONFIG).frames[0].params.max_new_tokens == 4
    assert chat_plan(chat(top_k=-1, stop=["a", ""]), CONFIG).frames[0].params.top_k == 0


def test_text_parts_are_joined() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]}]
    assert chat_plan(chat(messages=parts), CONFIG).frames[0].text == "a b"


def test_n_choices_per_prompt_get_their_own_seeds() -> None:
    plan = completion_plan(completion(prompt=["x", "y"], n=3, seed=10), CONFIG)
    assert plan.n == 3
    assert [frame.text for frame in plan.frames] == ["x", "x", "x", "y", "y", "y"]
    assert [frame.params.seed for frame in plan.frames] == [10, 11, 12, 10, 11, 12]
    assert len({frame.request_id for frame in plan.frames}) == 6
    unseeded = completion_plan(completion(n=2), CONFIG)
    assert [frame.params.seed for frame in unseeded.frames] == [None, None]


def test_completion_has_no_chat_template_and_openai_default_length() -> None:
    params = completion_plan(completion(), CONFIG).frames[0].params
    assert (params.use_chat_template, params.max_new_tokens) == (False, COMPLETION_MAX_TOKENS)


def refusal(plan: Any, body: Any) -> LiftoffError:
    with pytest.raises(LiftoffError) as info:
        plan(body, CONFIG)
    return info.value


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"1": 2.0}}, "logit_bias"),
        ({"response_format": {"type": "json_object", "grammar": "x"}}, "response_format.grammar"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "x": 1}}},
            "response_format.json_schema.x",
        ),
        ({"parallel_tool_calls": True}, "parallel_tool_calls"),
        ({"messages": [*USER, {"role": "tool", "content": "42", "tool_call_id": "t"}]}, "messages[1].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
        ({"messages": [{"role": "user", "content": "x", "audio": {}}]}, "messages[0].audio"),
        ({"stream_options": {"include_usage": True, "every_chunk": True}}, "stream_options.every_chunk"),
    ],
)
def test_unsupported_chat_fields_are_refused_by_name(fields: dict[str, Any], param: str) -> None:
    error = refusal(chat_plan, chat(**fields))
    assert isinstance(error, NotSupportedError)
    assert error.param == param
    assert error.status == 400


def test_response_format_becomes_the_json_schema_of_the_output() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    sdk_shape = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    params = chat_plan(chat(response_format=sdk_shape), CONFIG).frames[0].params
    assert params.json_schema is not None
    assert json.loads(params.json_schema) == schema
    assert params.regex_string is None
    assert chat_plan(chat(response_format={"type": "json_object"}), CONFIG).frames[0].params.json_schema == (
        JSON_OBJECT_SCHEMA
    )
    assert json.loads(JSON_OBJECT_SCHEMA) == {"type": "object"}
    assert chat_plan(chat(response_format={"type": "text"}), CONFIG).frames[0].params.json_schema is None
    assert chat_plan(chat(), CONFIG).frames[0].params.json_schema is None
    boolean = {"type": "json_schema", "json_schema": {"name": "any", "schema": True}}
    assert chat_plan(chat(response_format=boolean), CONFIG).frames[0].params.json_schema == "true"


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ],
)
def test_json_schema_format_without_a_schema_is_400(response_format: dict[str, Any], param: str) -> None:
    error = refusal(chat_plan, chat(response_format=response_format))
    assert isinstance(error, InvalidRequestError)
    assert error.param == param
    assert error.status == 400
    assert "the JSON schema the output must follow" in error.message


def test_harmless_values_of_unsupported_fields_are_accepted() -> None:
    body = chat(logprobs=False, frequency_penalty=0, presence_penalty=0.0, logit_bias={}, tool_choice="none",
                response_format={"type": "text"}, user="u", parallel_tool_calls=None)  # fmt: skip
    assert len(chat_plan(body, CONFIG).frames) == 1


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"echo": True}, "echo"), ({"suffix": "s"}, "suffix"), ({"best_of": 2}, "best_of"), ({"logprobs": 1}, "logprobs")],
)
def test_unsupported_completion_fields_are_refused_by_name(fields: dict[str, Any], param: str) -> None:
    error = refusal(completion_plan, completion(**fields))
    assert isinstance(error, NotSupportedError)
    assert error.param == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
        ({"max_tokens": 3, "min_tokens": 4}, "min_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"n": 7}, "n"),
    ],
)
def test_invalid_combinations_are_400s_naming_the_field(fields: dict[str, Any], param: str) -> None:
    error = refusal(chat_plan, chat(**fields))
    assert isinstance(error, InvalidRequestError)
    assert error.param == param


def test_continuous_usage_stats_ask_the_reader_for_running_counts_when_streaming() -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    assert chat_plan(chat(stream=True, stream_options=options), CONFIG).frames[0].params.running_counts
    assert not chat_plan(chat(stream=False, stream_options=options), CONFIG).frames[0].params.running_counts
    assert not completion_plan(completion(stream=True), CONFIG).frames[0].params.running_counts


def test_prompt_limits_name_the_openai_field() -> None:
    small = AppConfig(max_prompt_string_bytes=4, max_user_batch_size=2)
    too_long = refusal(lambda body, _: completion_plan(body, small), completion(prompt="12345"))
    assert (too_long.param, too_long.message) == (
        "prompt",
        "the prompt is 5 bytes, more than max_prompt_string_bytes (4)",
    )
    too_many = refusal(lambda body, _: completion_plan(body, small), completion(prompt=["a", "b", "c"]))
    assert too_many.param == "prompt"
    assert too_many.message.startswith("prompt has 3 prompts")
    empty = refusal(lambda body, _: completion_plan(body, small), completion(prompt=[]))
    assert (empty.param, empty.message) == ("prompt", "prompt is an empty list; send at least one prompt")
    long_chat = refusal(lambda body, _: chat_plan(body, small), chat())
    assert long_chat.param == "messages"


def test_conversations_go_to_the_reader_turn_by_turn() -> None:
    turns = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        {"role": "user", "content": "bye"},
    ]
    frame = chat_plan(chat(messages=turns), CONFIG).frames[0]
    assert frame.params.use_chat_template
    assert frame.params.messages == (("system", "Be brief."), ("user", "hi"), ("assistant", "hello"), ("user", "bye"))
    assert frame.text == "bye"


def test_turns_without_content_are_400s() -> None:
    silent = refusal(chat_plan, chat(messages=[{"role": "assistant", "content": None}, *USER]))
    assert silent.param == "messages[0].content"
