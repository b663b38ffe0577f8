"""The cache key: the same request always hashes the same, anything that changes the answer changes
the key, and only deterministic requests are cacheable."""

from __future__ import annotations

from parley.cache.v1 import cache_pb2
from parley.inference.v1 import inference_pb2 as pb

from services.cache import keys
from services.cache.client import CacheClient


def key(messages=(("user", "Hi"),), model="m", fingerprint="98-1700000000", **sampling) -> cache_pb2.CompletionKey:
    sampling.setdefault("temperature", 0.0)
    return cache_pb2.CompletionKey(
        model=model, model_fingerprint=fingerprint,
        messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
        sampling=pb.SamplingParams(**sampling),
    )


def test_same_request_same_digest_and_it_is_sha256_hex() -> None:
    a, b = key(max_tokens=16, stop=["x", "y"]), key(stop=["y", "x"], max_tokens=16)
    assert keys.digest(a) == keys.digest(b)  # field order and stop order do not matter
    assert len(keys.digest(a)) == 64 and int(keys.digest(a), 16) >= 0


def test_everything_that_changes_the_answer_changes_the_digest() -> None:
    base = keys.digest(key())
    variants = [
        key(model="other"),
        key(fingerprint="98-1700000001"),  # the weights file changed
        key(messages=(("user", "Hi!"),)),
        key(messages=(("system", "Hi"),)),
        key(messages=(("user", "Hi"), ("assistant", ""))),
        key(max_tokens=16),
        key(seed=1),
        key(top_k=1),
        key(stop=["."]),
        key(min_p=0.1),
        key(presence_penalty=1.0),
        key(frequency_penalty=1.0),
        key(logit_bias={42: -100.0}),
        key(logit_bias={42: 5.0}),
    ]
    digests = {keys.digest(v) for v in variants}
    assert base not in digests and len(digests) == len(variants)


def test_a_non_finite_logit_bias_is_not_cacheable() -> None:
    assert "logit_bias" in keys.cacheable(key(logit_bias={1: float("inf")}))


def test_message_boundaries_are_part_of_the_key() -> None:
    assert keys.digest(key(messages=(("user", "ab"), ("user", "c")))) != \
        keys.digest(key(messages=(("user", "a"), ("user", "bc"))))


def test_unset_is_not_the_same_as_an_explicit_default() -> None:
    # Defaults belong to the inference service and may change; an explicit value is what was asked.
    assert keys.digest(key()) != keys.digest(key(top_p=1.0))


def test_canonical_form_is_plain_json_with_unicode_kept() -> None:
    form = keys.canonical(key(messages=(("user", "Grüße 👋"),), max_tokens=8))
    assert form == {"model": "m", "model_fingerprint": "98-1700000000", "messages": [["user", "Grüße 👋"]],
                    "sampling": {"temperature": 0.0, "max_tokens": 8}}


def test_user_scope_separates_users() -> None:
    assert keys.digest(key(), "u1") != keys.digest(key(), "u2") != keys.digest(key())


def test_deterministic_only_with_temperature_zero_set_or_a_seed() -> None:
    assert CacheClient.is_deterministic(pb.SamplingParams(temperature=0))
    assert CacheClient.is_deterministic(pb.SamplingParams(temperature=0.9, seed=7))
    assert CacheClient.is_deterministic(pb.SamplingParams(seed=0))  # seed 0 is still a seed
    assert not CacheClient.is_deterministic(pb.SamplingParams())  # unset temperature: the default is > 0
    assert not CacheClient.is_deterministic(pb.SamplingParams(temperature=0.1))
    assert not CacheClient.is_deterministic(pb.SamplingParams(top_k=1))


def test_cacheable_needs_model_fingerprint_messages_and_determinism() -> None:
    assert keys.cacheable(key()) is None
    assert keys.cacheable(key(fingerprint="")) is not None
    assert keys.cacheable(key(model="")) is not None
    assert keys.cacheable(key(messages=())) is not None
    assert "deterministic" in keys.cacheable(key(temperature=0.5))
    assert keys.cacheable(key(top_p=float("nan"))) is not None


def test_a_raw_prompt_keys_apart_from_messages_and_old_chat_keys_are_unchanged() -> None:
    chat = key(messages=(("user", "Hi"),))
    prompt = key(messages=())
    prompt.prompt = "Hi"
    assert keys.cacheable(prompt) is None
    assert keys.digest(prompt) != keys.digest(chat)
    other = key(messages=())
    other.prompt = "Hi!"
    assert keys.digest(other) != keys.digest(prompt)
    assert "prompt" not in keys.canonical(chat)  # entries stored before prompts existed still match
    assert keys.cacheable(key(messages=())) == "no messages or prompt"
    both = key()
    both.prompt = "Hi"
    assert keys.cacheable(both) == "both messages and a prompt"
