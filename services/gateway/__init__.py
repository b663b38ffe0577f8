"""The Envoy gateway: its configuration is generated here from one source (envoy_config.py)."""
