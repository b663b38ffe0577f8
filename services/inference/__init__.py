"""Inference service: model registry, hardware-aware engines (llama.cpp, torch), scheduling and
token streaming, the OpenAI-compatible endpoints and Anthropic's Messages API."""
