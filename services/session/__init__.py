"""Session service: saved conversations and the streaming chat turn."""
