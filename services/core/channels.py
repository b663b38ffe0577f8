"""Outgoing gRPC channels: the one place where a service opens a channel to another service.

Every client call a service makes goes through a channel from `open_channel`, so that what applies
to every outgoing call (keepalive, message sizes, telemetry interceptors) is configured here once.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from services.core import config, telemetry
from services.core.server import MAX_MESSAGE_BYTES

# Keepalive keeps long-lived channels usable across idle NAT/conntrack timeouts; message limits match
# the servers' (a long conversation history can exceed gRPC's 4 MiB default).
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A restarted service is reached again within a second or two (gRPC's default backoff grows to
    # two minutes, so a caller would keep failing fast long after the callee is back).
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)

# Client interceptors added to every channel: telemetry's client spans and trace propagation.
CLIENT_INTERCEPTORS: list[grpc.aio.ClientInterceptor] = telemetry.client_interceptors()


def open_channel(common: config.CommonSettings, service: str,
                 interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> grpc.aio.Channel:
    """An insecure channel to `service` ("auth", "session", "cache" or "inference") at its configured target."""
    return grpc.aio.insecure_channel(common.target_of(service), options=CHANNEL_OPTIONS,
                                     interceptors=[*CLIENT_INTERCEPTORS, *interceptors] or None)
