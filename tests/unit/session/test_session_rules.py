"""The session service's small rules: sampling merges and checks, page tokens."""

from __future__ import annotations

import pytest
from parley.inference.v1 import inference_pb2 as pb

from services.core.errors import InvalidArgument
from services.session.rules import (
    check_sampling, decode_cursor, encode_cursor, merge_sampling, sampling_from_dict, sampling_to_dict,
)


def test_turn_overrides_only_what_it_sets() -> None:
    base = pb.SamplingParams(temperature=0.2, max_tokens=64, stop=["\n\n"])
    merged = merge_sampling(base, pb.SamplingParams(temperature=0.0, seed=7))
    assert merged.HasField("temperature") and merged.temperature == 0.0  # an explicit 0 counts
    assert (merged.max_tokens, merged.seed, list(merged.stop)) == (64, 7, ["\n\n"])
    assert list(merge_sampling(base, pb.SamplingParams(stop=["END"])).stop) == ["END"]
    biased = merge_sampling(pb.SamplingParams(logit_bias={1: 2.0, 3: 4.0}), pb.SamplingParams(logit_bias={5: -1.0}))
    assert dict(biased.logit_bias) == {5: -1.0}  # a map is replaced whole, like stop


def test_sampling_round_trips_through_its_stored_form() -> None:
    params = pb.SamplingParams(temperature=0.0, top_k=5, stop=["x"])
    stored = sampling_to_dict(params)
    assert stored == {"temperature": 0.0, "top_k": 5, "stop": ["x"]}
    assert sampling_from_dict(stored) == params


@pytest.mark.parametrize("params", [pb.SamplingParams(temperature=3), pb.SamplingParams(top_p=0),
                                    pb.SamplingParams(stop=["a"] * 9), pb.SamplingParams(min_p=1.5),
                                    pb.SamplingParams(presence_penalty=-3), pb.SamplingParams(frequency_penalty=2.5),
                                    pb.SamplingParams(logit_bias={7: 101.0}), pb.SamplingParams(logit_bias={-1: 1.0})])
def test_bad_sampling_is_invalid_argument(params: pb.SamplingParams) -> None:
    with pytest.raises(InvalidArgument):
        check_sampling(params)


def test_page_tokens_round_trip_and_reject_tampering() -> None:
    token = encode_cursor("s", 1700000000.5, "abc")
    assert decode_cursor(token, "s") == [1700000000.5, "abc"]
    for bad in ("garbage!", encode_cursor("m", 3), "e30", "", "WyJzIl0", encode_cursor("s", "x", "abc"),
                encode_cursor("s", 1.5, "abc", 3)):
        with pytest.raises(InvalidArgument, match="page_token"):
            decode_cursor(bad, "s")
    for bad in ("WyJtIiwiYWJjIl0", encode_cursor("m", True), encode_cursor("m")):  # ["m", "abc"], a bool, nothing
        with pytest.raises(InvalidArgument, match="page_token"):
            decode_cursor(bad, "m")
    assert decode_cursor(encode_cursor("m", 7), "m") == [7]
