from services.inference.engines.base import StopMatcher


def feed_all(matcher: StopMatcher, pieces: list[bytes]) -> str:
    out = "".join(matcher.feed(p) for p in pieces if not matcher.stopped)
    return out + ("" if matcher.stopped else matcher.flush())


def test_text_passes_through_without_stops() -> None:
    assert feed_all(StopMatcher([]), [b"Hel", b"lo", b"!"]) == "Hello!"


def test_stop_sequence_split_across_tokens_is_cut() -> None:
    matcher = StopMatcher(["END"])
    assert feed_all(matcher, [b"one E", b"N", b"D two"]) == "one "
    assert matcher.stopped


def test_partial_match_that_is_not_a_stop_is_released() -> None:
    assert feed_all(StopMatcher(["END"]), [b"EN", b"oh"]) == "ENoh"


def test_multibyte_characters_split_across_tokens() -> None:
    snowman = "☃".encode()
    assert feed_all(StopMatcher([]), [snowman[:1], snowman[1:], b"!"]) == "☃!"


def test_first_of_several_stops_wins() -> None:
    assert feed_all(StopMatcher(["b", "c"]), [b"aacb"]) == "aa"
