"""The inference service's settings (PARLEY_* environment variables)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from services.core.config import ConfigError, setting


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    models_file: Path | None = setting(None, help="JSON catalogue of models; default: the bundled model")
    default_model: str = setting("smollm2-135m-instruct")
    engine: str = setting("auto", choices=("auto", "llama.cpp", "torch"))
    device: str = setting("auto", help="auto, cpu, cuda, cuda:N or mps")
    threads: int = setting(0, min=0, help="CPU threads per engine; 0 = physical cores")
    gpu_layers: int | None = setting(None, min=-1, help="llama.cpp layers on the GPU; -1 = all")
    dtype: str = setting("auto", choices=("auto", "float32", "float16", "bfloat16"))
    quantization: str = setting("none", choices=("none", "8bit", "4bit"))
    context_length: int = setting(4096, min=128, help="context window of one request (prompt + answer), in tokens")
    parallel_slots: int = setting(0, min=0, help="generations decoded together per model; 0 = auto")
    queue_depth: int = setting(16, min=0, help="requests that may wait for the engine before 429")
    fair_share: bool = setting(True, help="serve users in turn (equal shares of the engine, a newcomer's request "
                                          "pausing a heavy user's stream); off: first come, first served")
    kv_cache_tokens: int = setting(0, min=0, help="llama.cpp KV cells shared by all sequences of a model; 0 = auto")
    resident_sequences: int = setting(0, min=0, max=256,
                                      help="conversations whose KV stays warm in a llama.cpp model; 0 = auto")
    batch_tokens: int = setting(512, min=16, help="tokens per decode step (running tokens + prompt chunks)")
    flash_attention: str = setting("on", choices=("on", "off"),
                                   help="llama.cpp flash attention (keep it on: with Parley's patch to llama.cpp a "
                                        "long conversation's turn costs less with it, and off seeded answers no "
                                        "longer repeat)")
    draft_tokens: int = setting(8, min=0, max=64,
                                help="llama.cpp speculative decoding: the longest draft a choice verifies in one step, "
                                     "taken from its own prompt and answer (n-gram lookup), shortened as the batch "
                                     "fills or acceptance drops; 0 = off")
    # 256: the most recent evictions come back from RAM in a few ms; older ones from the disk tier
    # (disk_kv_cache_mib) in ~20-30 ms, so more RAM here mostly holds conversations that never return.
    host_kv_cache_mib: int = setting(256, min=0, help="host RAM for evicted conversations' KV state; 0 = off")
    disk_kv_cache_mib: int = setting(4096, min=0, help="disk for idle conversations' KV state, kept across restarts "
                                                       "(least recently used dropped first); 0 = off")
    disk_kv_cache_dir: Path | None = setting(None, help="where idle conversations' KV state is kept; replicas may "
                                                        "share it; default: <PARLEY_DATA_DIR>/kv")
    memory_budget_mib: int = setting(0, min=0, help="memory for loaded models; 0 = 75% of what is free")
    keep_alive_seconds: float = setting(1800.0, min=0, help="idle time before a model unloads; 0 = never")
    max_tokens: int = setting(1024, min=1, help="default max_tokens when a request sets none")
    preload: bool = setting(True, help="load the default model at start-up (health waits for it)")
    request_timeout_seconds: float = setting(600.0, min=1, help="deadline when the caller sets none")
    max_prompt_characters: int = setting(
        0, min=0, help="characters a request's messages may hold, checked before anything renders them (a "
                       "longer chat is cut to its newest turns when it may be; else 400); 0 = 8 per token of "
                       "the model's context window")

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise ConfigError(f"PARLEY_DEVICE={self.device!r}: expected auto, cpu, cuda, cuda:N or mps")
