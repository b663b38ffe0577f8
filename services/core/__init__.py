"""What every Parley service shares: config, serve(), error mapping, logs, inter-service channels."""
