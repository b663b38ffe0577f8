"""Inference service: model registry, hardware-aware engines (llama.cpp, torch), scheduling and
token streaming, and the OpenAI-compatible chat completions endpoint."""
