"""Engine settings chosen from detected hardware, and config overrides."""

from __future__ import annotations

from services.core import config
from services.inference.hardware import CudaDevice, Hardware, choose, probe
from services.inference.settings import InferenceSettings

CPU = Hardware(physical_cores=8, logical_cpus=16, total_memory_mib=32000, available_memory_mib=30000)
GPU = Hardware(physical_cores=16, logical_cpus=32, total_memory_mib=128000, available_memory_mib=120000,
               cuda_devices=(CudaDevice(0, "NVIDIA H100", 80000, 79000),), llama_gpu_offload=True, torch_available=True)


def settings(**env: str) -> InferenceSettings:
    return config.load(InferenceSettings, {f"PARLEY_{k.upper()}": v for k, v in env.items()})


def test_cpu_host_gets_llama_cpp_with_one_thread_per_physical_core() -> None:
    chosen = choose(CPU, settings())
    assert (chosen.engine, chosen.device, chosen.threads, chosen.gpu_layers) == ("llama.cpp", "cpu", 8, 0)
    assert chosen.dtype == "float32" and chosen.quantization == ""


def test_cuda_host_offloads_every_layer() -> None:
    chosen = choose(GPU, settings())
    assert (chosen.engine, chosen.device, chosen.gpu_layers, chosen.dtype) == ("llama.cpp", "cuda", -1, "float16")
    assert chosen.parallel_slots == 16 and chosen.resident_sequences == 64


def test_cuda_without_llama_offload_falls_back_to_torch() -> None:
    hw = Hardware(**{**GPU.__dict__, "llama_gpu_offload": False})
    chosen = choose(hw, settings())
    assert chosen.engine == "torch" and any("without GPU offload" in r for r in chosen.reasons)


def test_every_choice_can_be_overridden() -> None:
    chosen = choose(GPU, settings(device="cpu", engine="torch", threads="3", gpu_layers="10", dtype="bfloat16",
                                  parallel_slots="2"))
    assert (chosen.device, chosen.engine, chosen.threads, chosen.gpu_layers, chosen.dtype, chosen.parallel_slots) == \
        ("cpu", "torch", 3, 10, "bfloat16", 2)
    assert any("set by PARLEY_THREADS" in r for r in chosen.reasons)


def test_cpu_llama_cpp_sizes_its_batch_and_kv_cache() -> None:
    chosen = choose(CPU, settings(context_length="4096"))
    assert (chosen.parallel_slots, chosen.resident_sequences, chosen.kv_cache_tokens) == (8, 32, 16384)
    assert any(r.startswith("kv_cache_tokens=16384") for r in chosen.reasons)
    small = choose(Hardware(**{**CPU.__dict__, "available_memory_mib": 1024}), settings())
    assert small.host_cache_mib == 128 and any("1/8 of free memory" in r for r in small.reasons)


def test_quantization_needs_cuda() -> None:
    assert choose(GPU, settings(quantization="4bit")).quantization == "4bit"
    chosen = choose(CPU, settings(quantization="8bit"))
    assert chosen.quantization == "" and any("needs CUDA" in r for r in chosen.reasons)


def test_probe_reads_this_machine() -> None:
    hw = probe()
    assert hw.physical_cores >= 1 and hw.logical_cpus >= hw.physical_cores
    assert hw.total_memory_mib > 0 and 0 < hw.available_memory_mib <= hw.total_memory_mib
