"""``liftoff.gateway.translate.native``: request → frames, Takeoff defaults for nulls, and the gateway's limits."""

from __future__ import annotations

import json
from typing import Any

import pytest

from liftoff.config.models import AppConfig
from liftoff.core.errors import InvalidRequestError
from liftoff.core.types import GenerationParams
from liftoff.gateway.translate.native import generate_frames, generation_params, prompts_of
from liftoff.protocol.native import GenerateRequest

ALL_NULL: dict[str, Any] = {
    "consumer_group": None,
    "max_new_tokens": None,
    "min_new_tokens": None,
    "sampling_temperature": None,
    "sampling_topk": None,
    "sampling_topp": None,
    "repetition_penalty": None,
    "no_repeat_ngram_size": None,
    "prompt_max_tokens": None,
    "regex_string": None,
    "json_schema": None,
    "constrained_decoding_backend": None,
    "lora_id": None,
    "use_chat_template": None,
    "image_paths": None,
    "return_metadata": None,
}


def body(**fields: Any) -> GenerateRequest:
    return GenerateRequest.model_validate({"text": "hi", **fields})


def test_nulls_give_takeoff_defaults() -> None:
    params = generation_params(body(**ALL_NULL))
    assert params == GenerationParams()
    assert (params.max_new_tokens, params.temperature, params.top_k, params.top_p) == (128, 1.0, 1, 1.0)
    assert params.use_chat_template is False
    assert params.return_metadata is False


def test_missing_fields_give_the_same_defaults() -> None:
    assert generation_params(body()) == generation_params(body(**ALL_NULL))


def test_values_are_mapped_to_internal_names() -> None:
    params = generation_params(
        body(
            max_new_tokens=7,
            min_new_tokens=2,
            sampling_temperature=0.5,
            sampling_topk=40,
            sampling_topp=0.9,
            repetition_penalty=1.2,
            no_repeat_ngram_size=3,
            prompt_max_tokens=100,
            regex_string="[a-z]+",
            constrained_decoding_backend="outlines",
            lora_id="adapter",
            use_chat_template=True,
            return_metadata=True,
        )
    )
    assert params == GenerationParams(
        max_new_tokens=7,
        min_new_tokens=2,
        temperature=0.5,
        top_k=40,
        top_p=0.9,
        repetition_penalty=1.2,
        no_repeat_ngram_size=3,
        prompt_max_tokens=100,
        regex_string="[a-z]+",
        constrained_decoding_backend="outlines",
        lora_id="adapter",
        use_chat_template=True,
        return_metadata=True,
    )


def test_zero_temperature_and_topk_are_kept() -> None:
    params = generation_params(body(sampling_temperature=0.0, sampling_topk=0))
    assert params.temperature == 0.0
    assert params.top_k == 0


def test_json_schema_dict_is_serialised() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    params = generation_params(body(json_schema=schema))
    assert params.json_schema is not None
    assert json.loads(params.json_schema) == schema


def test_json_schema_string_is_kept_verbatim() -> None:
    text = '{"type":  "array"}'
    assert generation_params(body(json_schema=text)).json_schema == text


def test_json_schema_string_that_is_not_json_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="json_schema is a string but not JSON") as info:
        generation_params(body(json_schema="{oops"))
    assert info.value.param == "json_schema"


def test_json_schema_boolean() -> None:
    assert generation_params(body(json_schema=True)).json_schema == "true"


# ---- limits -------------------------------------------------------------------------------------------------------


def test_single_prompt_and_list() -> None:
    config = AppConfig()
    assert prompts_of("one", config) == ["one"]
    assert prompts_of(["a", "b"], config) == ["a", "b"]


def test_empty_list_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="empty list") as info:
        prompts_of([], AppConfig())
    assert info.value.param == "text"


def test_too_many_prompts_names_the_numbers() -> None:
    config = AppConfig(max_user_batch_size=3)
    assert len(prompts_of(["x"] * 3, config)) == 3
    with pytest.raises(InvalidRequestError, match=r"text has 4 prompts, more than max_user_batch_size \(3\)"):
        prompts_of(["x"] * 4, config)


def test_prompt_size_is_counted_in_utf8_bytes() -> None:
    config = AppConfig(max_prompt_string_bytes=4)
    assert prompts_of("éé", config) == ["éé"]  # 4 bytes
    with pytest.raises(InvalidRequestError, match=r"the prompt is 6 bytes, more than max_prompt_string_bytes \(4\)"):
        prompts_of("ééé", config)  # 3 characters, 6 bytes


def test_oversized_prompt_in_a_list_is_named_by_index() -> None:
    with pytest.raises(InvalidRequestError, match=r"prompt 1 is 6 bytes, more than max_prompt_string_bytes \(5\)"):
        prompts_of(["ok", "sixsix", "x"], AppConfig(max_prompt_string_bytes=5))


def test_min_new_tokens_above_max_new_tokens_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match=r"min_new_tokens \(9\) is more than max_new_tokens \(3\)") as info:
        generate_frames(body(min_new_tokens=9, max_new_tokens=3), AppConfig())
    assert info.value.param == "min_new_tokens"
    with pytest.raises(InvalidRequestError, match=r"min_new_tokens \(200\) is more than max_new_tokens \(128\)"):
        generate_frames(body(min_new_tokens=200), AppConfig())


# ---- frames ---------------------------------------------------------------------------------------------------------


def test_one_frame_per_prompt_with_shared_params_and_group() -> None:
    frames = generate_frames(body(text=["a", "b", "c"], consumer_group="gen", max_new_tokens=5), AppConfig())
    assert [frame.text for frame in frames] == ["a", "b", "c"]
    assert {frame.consumer_group for frame in frames} == {"gen"}
    assert all(frame.params.max_new_tokens == 5 for frame in frames)
    assert len({frame.request_id for frame in frames}) == 3


@pytest.mark.parametrize("group", [None, ""])
def test_default_consumer_group_is_primary(group: str | None) -> None:
    (frame,) = generate_frames(body(consumer_group=group), AppConfig())
    assert frame.consumer_group == "primary"


def test_request_ids_are_unique_across_requests() -> None:
    ids = {frame.request_id for _ in range(50) for frame in generate_frames(body(), AppConfig())}
    assert len(ids) == 50
