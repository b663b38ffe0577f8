"""The cache service's settings (PARLEY_* environment variables)."""

from __future__ import annotations

import dataclasses
from urllib.parse import urlsplit

from services.core.config import ConfigError, setting


@dataclasses.dataclass(frozen=True)
class CacheSettings:
    redis_url: str = setting("", secret=True,
                             help="redis://[:password@]host:port/db (or rediss://); empty = in-process LRU")
    cache_redis_timeout_ms: int = setting(50, min=1, max=60_000,
                                          help="longest a Redis operation may take before the cache is bypassed")
    cache_redis_retry_seconds: float = setting(1.0, min=0, max=3600,
                                               help="while degraded, how long to skip Redis before trying it again")
    cache_warning_interval_seconds: float = setting(60.0, min=0,
                                                    help="at most one 'Redis unavailable' warning per interval")
    cache_ttl_seconds: int = setting(3600, min=1, help="how long a cached response lives")
    cache_max_entry_bytes: int = setting(256 * 1024, min=64, help="larger responses are not cached")
    cache_max_bytes: int = setting(64 * 1024 * 1024, min=1024, help="in-process LRU: total size bound")
    cache_max_entries: int = setting(10_000, min=1, help="in-process LRU: entry count bound")
    cache_scope: str = setting("global", choices=("global", "user"),
                               help="global: users share entries; user: each user has their own")
    # Per user (all of their credentials together); 0 = unlimited.
    rate_limit_requests_per_minute: int = setting(60, min=0)
    rate_limit_tokens_per_minute: int = setting(100_000, min=0)
    # Token budgets per user: prompt + completion tokens per UTC calendar day and month; 0 = unlimited.
    rate_limit_tokens_per_day: int = setting(0, min=0, max=2**31 - 1)
    rate_limit_tokens_per_month: int = setting(0, min=0, max=2**31 - 1)
    usage_flush_seconds: float = setting(1.0, min=0.05, max=60,
                                         help="how often the usage ledger writes to its database (at most this much "
                                              "is lost when the process is killed)")
    # Per API key, on top of the user's limit; 0 = the user's limit.
    rate_limit_api_key_requests_per_minute: int = setting(0, min=0)
    rate_limit_api_key_tokens_per_minute: int = setting(0, min=0)

    def validate(self) -> None:
        if self.redis_url and urlsplit(self.redis_url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError("PARLEY_REDIS_URL: expected redis://host:port/db, rediss://… or unix://…")
        if self.cache_max_entry_bytes > self.cache_max_bytes:
            raise ConfigError("PARLEY_CACHE_MAX_ENTRY_BYTES must not exceed PARLEY_CACHE_MAX_BYTES")

    @property
    def redis_timeout_seconds(self) -> float:
        return self.cache_redis_timeout_ms / 1000
