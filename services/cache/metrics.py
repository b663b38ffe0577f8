"""Cache metrics (Prometheus): what the response cache saves and when its backend fails.

- parley_cache_hits_total / parley_cache_misses_total: response-cache lookups that found an entry or
  not (a bypassed backend counts as a miss).
- parley_cache_redis_errors_total{operation}: Redis round trips that failed or timed out.
"""

from __future__ import annotations

import prometheus_client

HITS = prometheus_client.Counter("parley_cache_hits_total", "Response-cache lookups that found an entry")
MISSES = prometheus_client.Counter("parley_cache_misses_total", "Response-cache lookups that found nothing")
REDIS_ERRORS = prometheus_client.Counter("parley_cache_redis_errors_total",
                                         "Redis round trips that failed or timed out", ["operation"])
