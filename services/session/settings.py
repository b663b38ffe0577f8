"""The session service's settings (PARLEY_* environment variables)."""

from __future__ import annotations

import dataclasses

from services.core.config import setting


@dataclasses.dataclass(frozen=True)
class SessionSettings:
    max_message_chars: int = setting(100_000, min=1, help="longest chat message accepted (the context window decides the rest)")
    max_system_prompt_chars: int = setting(32_000, min=0)
    max_title_chars: int = setting(200, min=1)
    default_page_size: int = setting(50, min=1, max=1000)
    max_page_size: int = setting(200, min=1, max=1000)
    answer_reserve_tokens: int = setting(
        512, min=1, help="context kept free for the answer when the history is trimmed and the turn sets no max_tokens")
    checkpoint_seconds: float = setting(
        2.0, min=0.1, help="how often a partial answer is saved while it streams (survives a crash of this service)")
    inference_timeout_seconds: float = setting(600.0, min=1, help="deadline of one answer's generation")
    websocket_auth_seconds: float = setting(
        5.0, min=0.1, max=300, help="how long a WebSocket without an Authorization header has to send its auth message")
    websocket_idle_seconds: float = setting(
        300.0, min=1, help="a WebSocket with no message from its client and no answer streaming closes after this long")
    websocket_send_buffer_bytes: int = setting(
        262_144, min=1024, help="bytes a WebSocket may have waiting for a slow client before sends wait")
    websocket_send_timeout_seconds: float = setting(
        10.0, min=0.1, help="how long a send may wait for a slow client (its buffer full) before the socket closes")
    websocket_max_message_bytes: int = setting(1_048_576, min=1024, help="largest message a WebSocket client may send")
    # The gateway's CORS list (the same PARLEY_CORS_ORIGINS): a page from one of these origins may
    # call the REST API, so it may open a WebSocket too. The gateway's own origin always may.
    cors_origins: tuple[str, ...] = setting(
        (), help="comma-separated origins whose pages may open a WebSocket besides the gateway's own")
    turn_lease_seconds: float = setting(
        30.0, min=1, max=3600, help="lifetime of a running turn's lease (renewed while it runs): how long a "
                                    "session stays busy after the replica running its turn dies")
