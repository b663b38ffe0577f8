"""Hardware detection and the engine settings chosen from it.

The probe never imports torch unless it is installed, and never fails: a missing capability is
simply reported as absent. `choose()` turns what was found into engine settings; every choice can
be overridden by configuration, and `reasons` says which were.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

from services.inference.settings import InferenceSettings


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    total_memory_mib: int
    free_memory_mib: int


@dataclass(frozen=True)
class Hardware:
    physical_cores: int
    logical_cpus: int
    total_memory_mib: int
    available_memory_mib: int
    cuda_devices: tuple[CudaDevice, ...] = ()
    mps_available: bool = False
    llama_gpu_offload: bool = False
    torch_available: bool = False


@dataclass
class EngineSettings:
    engine: str
    device: str
    threads: int
    gpu_layers: int
    dtype: str
    quantization: str
    context_length: int
    parallel_slots: int
    queue_depth: int = 16
    kv_cache_tokens: int = 0
    resident_sequences: int = 1
    batch_tokens: int = 512
    host_cache_mib: int = 0
    reasons: list[str] = field(default_factory=list)


def _physical_cores() -> int:
    """Distinct (physical id, core id) pairs from /proc/cpuinfo, bounded by this process's CPU set."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return logical
    cores, physical = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            cores.add((physical, value.strip()))
    return max(1, min(len(cores) or logical, logical))


def _memory_mib() -> tuple[int, int]:
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) // 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    total = values.get("MemTotal", 0)
    # A cgroup limit (containers, Kubernetes) is the real ceiling.
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            raw = f.read().strip()
        if raw != "max":
            total = min(total, int(raw) // (1024 * 1024))
    except (OSError, ValueError):
        pass
    return total, min(values.get("MemAvailable", total), total)


def _torch_devices() -> tuple[tuple[CudaDevice, ...], bool]:
    if importlib.util.find_spec("torch") is None:
        return (), False
    import torch

    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            devices.append(
                CudaDevice(index, torch.cuda.get_device_name(index), total // 2**20, free // 2**20)
            )
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return tuple(devices), mps


def _llama_gpu_offload() -> bool:
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # noqa: BLE001 - an old or broken build simply has no offload
        return False


def probe() -> Hardware:
    total, available = _memory_mib()
    cuda, mps = _torch_devices()
    return Hardware(
        physical_cores=_physical_cores(),
        logical_cpus=os.cpu_count() or 1,
        total_memory_mib=total,
        available_memory_mib=available,
        cuda_devices=cuda,
        mps_available=mps,
        llama_gpu_offload=_llama_gpu_offload(),
        torch_available=importlib.util.find_spec("torch") is not None,
    )


def choose(hw: Hardware, settings: InferenceSettings, model_engine: str = "auto") -> EngineSettings:
    """Engine settings for one model. `model_engine` is the catalogue's choice for that model."""
    reasons: list[str] = []

    device = settings.device
    if device == "auto":
        if hw.cuda_devices and (hw.llama_gpu_offload or hw.torch_available):
            device = "cuda"
            reasons.append(f"device=cuda: {len(hw.cuda_devices)} CUDA device(s) found")
        elif hw.mps_available:
            device = "mps"
            reasons.append("device=mps: Apple Metal available")
        else:
            device = "cpu"
            reasons.append("device=cpu: no GPU found")
    else:
        reasons.append(f"device={device}: set by PARLEY_DEVICE")

    engine = model_engine if model_engine != "auto" else settings.engine
    if engine == "auto":
        if device.startswith("cuda") and not hw.llama_gpu_offload and hw.torch_available:
            engine = "torch"
            reasons.append("engine=torch: llama.cpp was built without GPU offload")
        else:
            engine = "llama.cpp"
            reasons.append("engine=llama.cpp: fastest for GGUF on this device")
    else:
        reasons.append(f"engine={engine}: set by config")

    threads = settings.threads or hw.physical_cores
    reasons.append(
        f"threads={threads}: " + ("set by PARLEY_THREADS" if settings.threads else "one per physical core")
    )

    if settings.gpu_layers is not None:
        gpu_layers = settings.gpu_layers
        reasons.append(f"gpu_layers={gpu_layers}: set by PARLEY_GPU_LAYERS")
    elif device != "cpu" and engine == "llama.cpp" and hw.llama_gpu_offload:
        gpu_layers = -1
        reasons.append("gpu_layers=-1: offload every layer")
    else:
        gpu_layers = 0

    dtype = settings.dtype
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") or device == "mps" else "float32"
    quantization = "" if settings.quantization == "none" else settings.quantization
    if quantization and not device.startswith("cuda"):
        reasons.append(f"quantization={quantization} ignored: bitsandbytes needs CUDA")
        quantization = ""

    slots = settings.parallel_slots
    if slots:
        reasons.append(f"parallel_slots={slots}: set by PARLEY_PARALLEL_SLOTS")
    elif engine == "llama.cpp":
        # Choices decoded together in one batch: a bigger batch raises throughput until the cores
        # (or the GPU) are busy; past that each stream only slows down.
        slots = 16 if device != "cpu" else 8
        reasons.append(f"parallel_slots={slots}: sequences decoded together per step on {device}")
    else:
        # The torch engine runs a slot per thread; on CPU every slot competes for the same cores.
        slots = 8 if device != "cpu" else max(2, min(4, hw.physical_cores * 2))
        reasons.append(f"parallel_slots={slots}: torch slots on {device}")

    resident = settings.resident_sequences
    if resident:
        reasons.append(f"resident_sequences={resident}: set by PARLEY_RESIDENT_SEQUENCES")
    else:
        resident = min(256, max(4 * slots, 16))
        reasons.append(f"resident_sequences={resident}: four conversations kept warm per running one")
    resident = max(resident, slots)

    kv_tokens = settings.kv_cache_tokens
    if kv_tokens:
        reasons.append(f"kv_cache_tokens={kv_tokens}: set by PARLEY_KV_CACHE_TOKENS")
    else:
        # Room for every running sequence at half the context, and at least one whole context.
        kv_tokens = max(settings.context_length, slots * settings.context_length // 2, 8192)
        reasons.append(f"kv_cache_tokens={kv_tokens}: {slots} running sequences at half the context window")

    host_mib = min(settings.host_kv_cache_mib, hw.available_memory_mib // 8) if hw.available_memory_mib else \
        settings.host_kv_cache_mib
    reasons.append(f"host_kv_cache_mib={host_mib}: evicted conversations' KV state"
                   + (" (capped at 1/8 of free memory)" if host_mib < settings.host_kv_cache_mib else ""))

    return EngineSettings(
        engine=engine,
        device=device,
        threads=threads,
        gpu_layers=gpu_layers,
        dtype=dtype,
        quantization=quantization,
        context_length=settings.context_length,
        parallel_slots=slots,
        queue_depth=settings.queue_depth,
        kv_cache_tokens=kv_tokens,
        resident_sequences=resident,
        batch_tokens=settings.batch_tokens,
        host_cache_mib=host_mib,
        reasons=reasons,
    )
