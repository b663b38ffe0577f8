"""Cache service: response cache for deterministic requests and rate-limit counters."""
