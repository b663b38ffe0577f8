"""The URL's id against the body's, from the methods' google.api.http bindings."""

from __future__ import annotations

import pytest
from parley.inference.v1 import inference_pb2
from parley.session.v1 import session_pb2

from services.core.errors import InvalidArgument
from services.core.path_ids import bindings, check

UPDATE = "/parley.session.v1.SessionService/UpdateSession"
LOAD = "/parley.inference.v1.InferenceService/LoadModel"


def test_only_methods_with_a_variable_in_their_path_are_checked() -> None:
    assert bindings("/parley.session.v1.SessionService/ListSessions") == ()
    assert bindings("/parley.session.v1.SessionService/Nothing") == ()
    (_, fields), = bindings(UPDATE)
    assert fields == ("session.id",)


@pytest.mark.parametrize("url", ["/v1/sessions/B", "/v1/sessions/B?update_mask=title", "/v1/sessions/%42"])
def test_the_same_id_passes(url: str) -> None:
    check(UPDATE, url, session_pb2.UpdateSessionRequest(session=session_pb2.Session(id="B")))


def test_another_id_is_refused_naming_the_field_and_both_values() -> None:
    with pytest.raises(InvalidArgument, match=r"session.id is 'B' in the request body but 'A' in the URL"):
        check(UPDATE, "/v1/sessions/A", session_pb2.UpdateSessionRequest(session=session_pb2.Session(id="B")))


def test_a_verb_after_the_id_is_not_part_of_it() -> None:
    check(LOAD, "/v1/models/m:1:load", inference_pb2.LoadModelRequest(id="m:1"))
    with pytest.raises(InvalidArgument):
        check(LOAD, "/v1/models/m:load", inference_pb2.LoadModelRequest(id="m:1"))
