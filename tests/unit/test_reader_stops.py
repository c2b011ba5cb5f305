"""Stop strings (``liftoff.reader.stops.StopScanner`` alone, then in the engine) and the engine's running counts."""

from __future__ import annotations

import random

import pytest

from liftoff.core.frames import FinalFrame
from liftoff.core.types import GenerationParams
from liftoff.reader.stops import StopScanner
from tests.unit.test_reader_engine import StartEngine, request, start_engine

__all__ = ["start_engine"]  # the fixture, imported for this module's tests


def scan(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool, list[str]]:
    """Feed every piece; return the released text, whether a stop was hit and what each feed released."""
    scanner = StopScanner(stops)
    released = []
    for piece in pieces:
        text, hit = scanner.feed(piece)
        released.append(text)
        if hit:
            return "".join(released), True, released
    released.append(scanner.flush())
    return "".join(released), False, released


def test_stop_inside_one_piece_cuts_before_it() -> None:
    assert scan(("END",), ["abc END def"])[:2] == ("abc ", True)


def test_stop_straddling_pieces_is_found_and_its_start_is_never_released() -> None:
    text, hit, released = scan(("###",), ["one #", "#", "# two"])
    assert (text, hit) == ("one ", True)
    assert released == ["one ", "", ""]


def test_held_tail_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    text, hit, released = scan(("abc",), ["xa", "b", "d"])
    assert (text, hit) == ("xabd", False)
    assert released == ["x", "", "abd", ""]


def test_held_tail_is_flushed_at_the_end() -> None:
    assert scan(("STOP",), ["go ST"])[:2] == ("go ST", False)


def test_earliest_of_several_stops_wins_and_empty_stops_are_ignored() -> None:
    assert scan(("", "b", "a c"), ["xx a c b"])[:2] == ("xx ", True)
    assert scan(("",), ["anything"])[:2] == ("anything", False)


@pytest.mark.parametrize("pieces", [["a", "b", "c", "S", "T", "O", "P", "d"], ["abcSTOPd"], ["abcST", "OPd"]])
def test_any_split_gives_the_same_answer(pieces: list[str]) -> None:
    assert scan(("STOP",), pieces)[:2] == ("abc", True)


def test_engine_stops_at_a_stop_string_frees_the_slot_and_counts_tokens(start_engine: StartEngine) -> None:
    engine, frames = start_engine(batch=1)
    params = GenerationParams(stop=(" three",), ignore_eos=True, max_new_tokens=10**9)
    engine.submit(request("q", "one two three four", params))
    final = frames.wait_final("q")
    assert isinstance(final, FinalFrame)
    assert "".join(token.text for token in frames.tokens("q")) == "one two"
    assert final.finish_reason == "stop"
    assert (final.prompt_tokens, final.completion_tokens) == (4, 3)  # " three" was generated, then cut
    assert final.seq == len(frames.tokens("q"))
    engine.submit(request("next", "free slot", GenerationParams(max_new_tokens=2)))
    assert frames.wait_final("next").finish_reason == "length"  # the only slot was freed


def test_engine_prompt_count_honours_prompt_max_tokens(start_engine: StartEngine) -> None:
    engine, frames = start_engine()
    params = GenerationParams(stop=("c",), prompt_max_tokens=2)
    engine.submit(request("q", "a b c d", params))
    final = frames.wait_final("q")
    assert "".join(token.text for token in frames.tokens("q")) == " "  # the prompt kept is " c d"
    assert (final.finish_reason, final.prompt_tokens) == ("stop", 2)


def test_engine_without_a_stop_hit_returns_everything(start_engine: StartEngine) -> None:
    engine, frames = start_engine()
    engine.submit(request("q", "one two th", GenerationParams(stop=("three",))))
    final = frames.wait_final("q")
    assert "".join(token.text for token in frames.tokens("q")) == "one two th"
    assert (final.finish_reason, final.prompt_tokens, final.completion_tokens) == ("stop", 3, 3)
    assert [token.seq for token in frames.tokens("q")] == list(range(len(frames.tokens("q"))))


def test_engine_running_counts_ride_on_every_token_frame(start_engine: StartEngine) -> None:
    engine, frames = start_engine()
    engine.submit(request("q", "one two three", GenerationParams(running_counts=True, use_chat_template=True)))
    final = frames.wait_final("q")
    tokens = frames.tokens("q")
    assert [(token.prompt_tokens, token.completion_tokens) for token in tokens] == [
        (5, 1),
        (5, 2),
        (5, 3),
        (5, 4),
        (5, 5),
    ]
    assert (final.prompt_tokens, final.completion_tokens) == (5, 5)
    engine.submit(request("plain", "one two"))
    frames.wait_final("plain")
    assert {(token.prompt_tokens, token.completion_tokens) for token in frames.tokens("plain")} == {(0, 0)}


def _oracle(stops: tuple[str, ...], text: str) -> tuple[str, bool]:
    """What a stream must release: the text before the stop string that is completed first (the longest, when
    several end at the same character), or all of it."""
    ends = [(index + len(stop), -len(stop)) for stop in stops if stop and (index := text.find(stop)) >= 0]
    if not ends:
        return text, False
    end, minus_length = min(ends)
    first_end = min(text.find(stop) + len(stop) for stop in stops if stop and stop in text)
    assert end == first_end
    return text[: end + minus_length], True


@pytest.mark.parametrize("seed", range(40))
def test_the_scanner_matches_the_oracle_on_random_streams(seed: int) -> None:
    rng = random.Random(seed)
    stops = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4)))
    text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 40)))
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
    pieces = [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    released, hit, _ = scan(stops, pieces)
    assert (released, hit) == _oracle(stops, text), (stops, pieces)


def test_a_long_stop_string_costs_the_length_of_the_text_only() -> None:
    stop = "x" * 100_000 + "!"
    scanner = StopScanner((stop,))
    for _ in range(1000):  # each piece would rescan the whole held tail with the old scanner
        assert scanner.feed("x" * 100) == ("", False)
    assert scanner.feed("!") == ("", True)
