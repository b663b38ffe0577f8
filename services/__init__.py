"""Parley's services: one sub-package each, plus `core`, what every service is built on."""
