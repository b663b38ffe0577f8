"""Engine settings chosen from detected hardware, and config overrides."""

from __future__ import annotations

import platform
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from services.core import config
from services.inference.models.hardware import CudaDevice, Hardware, choose, probe
from services.inference.settings import InferenceSettings

ROOT = Path(__file__).resolve().parents[3]

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
    assert (chosen.parallel_slots, chosen.resident_sequences, chosen.kv_cache_tokens) == (16, 64, 16384)
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


class FakeNvml(types.ModuleType):
    """pynvml's calls used by the probe, over a list of (uuid, name, total bytes, free bytes) or None
    for a GPU that NVML cannot read."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: list[tuple[str, str, int, int] | None], init_error: bool = False) -> None:
        super().__init__("pynvml")
        self.gpus, self.init_error, self.shut_down = gpus, init_error, False

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self.gpus[handle][0]

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self.gpus[handle][1]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> types.SimpleNamespace:
        if self.gpus[handle] is None:
            raise self.NVMLError("GPU is lost")
        _, _, total, free = self.gpus[handle]
        return types.SimpleNamespace(total=total, free=free, used=total - free)


H200 = ("GPU-8f2c1d9e-0000-0000-0000-000000000001", "NVIDIA H200", 143771 * 2**20, 143000 * 2**20)
L4 = ("GPU-3a7b5c11-0000-0000-0000-000000000002", "NVIDIA L4", 23034 * 2**20, 22000 * 2**20)


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> Callable[[FakeNvml | None], FakeNvml | None]:
    """Installs a fake pynvml; CUDA_VISIBLE_DEVICES starts unset."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def install(fake: FakeNvml | None) -> FakeNvml | None:
        monkeypatch.setitem(sys.modules, "pynvml", fake)  # None makes `import pynvml` fail
        return fake

    return install


def test_probe_lists_cuda_devices_through_nvml(nvml) -> None:
    fake = nvml(FakeNvml([H200]))
    assert probe().cuda_devices == (CudaDevice(0, "NVIDIA H200", 143771, 143000),)
    assert fake.shut_down


def test_probe_without_a_driver_finds_no_cuda_devices(nvml) -> None:
    nvml(FakeNvml([H200], init_error=True))
    assert probe().cuda_devices == ()
    assert choose(probe(), settings()).device == "cpu"


def test_an_unreadable_gpu_does_not_hide_the_others(nvml) -> None:
    nvml(FakeNvml([None, L4]))
    assert [d.name for d in probe().cuda_devices] == ["NVIDIA L4"]


def test_probe_without_pynvml_finds_no_cuda_devices(nvml) -> None:
    nvml(None)
    assert probe().cuda_devices == ()


def test_probe_honours_cuda_visible_devices(nvml, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA numbers only the GPUs it is shown; NVML sees them all."""
    nvml(FakeNvml([H200, L4]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert probe().cuda_devices == (CudaDevice(0, "NVIDIA L4", 23034, 22000),)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", L4[0][:12] + ",0")
    assert [d.name for d in probe().cuda_devices] == ["NVIDIA L4", "NVIDIA H200"]
    for hidden in ("", "-1", "7"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert probe().cuda_devices == ()


def test_mps_means_apple_silicon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert probe().mps_available
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert not probe().mps_available


def test_probe_and_the_inference_service_never_import_torch() -> None:
    """torch adds ~235 MB to the process; only loading a torch model may import it."""
    code = """
import asyncio, sys
from services.inference.models.hardware import probe
probe()
assert 'torch' not in sys.modules, 'probe() imported torch'
from services.core import config
from services.core.config import CommonSettings
from services.inference import app
from services.inference.settings import InferenceSettings
asyncio.run(app.build(config.load(CommonSettings, {}), config.load(InferenceSettings, {})))
assert 'torch' not in sys.modules, 'building the inference service imported torch'
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
