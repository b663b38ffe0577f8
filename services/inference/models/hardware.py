"""Hardware detection and the engine settings chosen from it.

The probe never imports torch, and never fails: a missing capability is simply reported as absent.
Importing torch only to count GPUs would add ~235 MB to every inference process, also those where
llama.cpp serves on CPU; torch loads only when the torch engine is chosen (engines/torch_engine.py).
`choose()` turns what was found into engine settings; every choice can be overridden by
configuration, and `reasons` says which were.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

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
    fair_share: bool = True  # engines.fair: users served in turn; False: first come, first served
    kv_cache_tokens: int = 0
    kv_cache_auto: bool = True  # the engine may lower kv_cache_tokens to fit the model's size
    resident_sequences: int = 1
    batch_tokens: int = 512
    host_cache_mib: int = 0
    disk_cache_dir: Path | None = None  # None: conversations' KV state is not kept on disk
    disk_cache_mib: int = 0
    flash_attention: bool = False
    draft_tokens: int = 0  # speculative decoding's longest draft (engines.speculation); 0 = off
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


@dataclass(frozen=True)
class _NvmlGpu:
    uuid: str
    name: str
    total_memory_mib: int
    free_memory_mib: int


def _cuda_devices() -> tuple[CudaDevice, ...]:
    """CUDA devices as the driver's management library (NVML) lists them.

    NVML ships with the NVIDIA driver and pynvml is a thin ctypes binding to it: no CUDA runtime, no
    torch. No pynvml, no driver (the usual CPU host) or a failing one means no devices, never an error.
    """
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return ()
    try:
        found = [_nvml_gpu(pynvml, index) for index in range(pynvml.nvmlDeviceGetCount())]
    except pynvml.NVMLError:
        found = []
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    visible = _cuda_visible(found, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return tuple(
        CudaDevice(index, gpu.name, gpu.total_memory_mib, gpu.free_memory_mib) for index, gpu in enumerate(visible)
    )


def _nvml_gpu(pynvml: ModuleType, index: int) -> _NvmlGpu | None:
    """One GPU, or None when NVML cannot read it (e.g. fallen off the bus): the others still count."""
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        uuid, name = pynvml.nvmlDeviceGetUUID(handle), pynvml.nvmlDeviceGetName(handle)
        return _NvmlGpu(uuid, name, memory.total // 2**20, memory.free // 2**20)
    except pynvml.NVMLError:
        return None


def _cuda_visible(found: list[_NvmlGpu | None], spec: str | None) -> list[_NvmlGpu]:
    """The GPUs CUDA (and so llama.cpp or torch) will use, in CUDA's order.

    NVML ignores CUDA_VISIBLE_DEVICES, CUDA does not: it holds indices or GPU-UUID prefixes and ends
    at the first entry that names no device, so "" or "-1" hides every GPU. Indices are taken in
    NVML's (PCI bus) order, which is CUDA's with CUDA_DEVICE_ORDER=PCI_BUS_ID or identical GPUs;
    MIG-… entries are not resolved (NVML lists whole GPUs here) and end the list.
    """
    if spec is None:
        return [gpu for gpu in found if gpu]
    visible: list[_NvmlGpu] = []
    for entry in (part.strip() for part in spec.split(",")):
        if entry.isdigit():
            gpu = found[int(entry)] if int(entry) < len(found) else None
        elif entry.startswith("GPU-"):
            gpu = next((g for g in found if g and g.uuid.startswith(entry)), None)
        else:
            gpu = None
        if gpu is None:
            break
        visible.append(gpu)
    return visible


def _mps_available() -> bool:
    """Apple Metal, judged from the platform instead of asking torch: an approximation that says yes
    for every Apple-silicon Mac (Darwin on arm64), where llama.cpp and torch both run on Metal. It
    says no for Intel Macs (whose AMD GPUs torch can use) and for x86-64 Python under Rosetta."""
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def _llama_gpu_offload() -> bool:
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # noqa: BLE001 - an old or broken build simply has no offload
        return False


def probe() -> Hardware:
    total, available = _memory_mib()
    return Hardware(
        physical_cores=_physical_cores(),
        logical_cpus=os.cpu_count() or 1,
        total_memory_mib=total,
        available_memory_mib=available,
        cuda_devices=_cuda_devices(),
        mps_available=_mps_available(),
        llama_gpu_offload=_llama_gpu_offload(),
        # find_spec looks for torch on sys.path without importing it.
        torch_available=importlib.util.find_spec("torch") is not None,
    )


def _device_and_engine(hw: Hardware, settings: InferenceSettings, model_engine: str,
                       reasons: list[str]) -> tuple[str, str]:
    """The device and the engine: as configured, else what this machine runs best."""
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
    return device, engine


def _capacity(hw: Hardware, settings: InferenceSettings, device: str, engine: str,
              reasons: list[str]) -> tuple[int, int, int]:
    """Choices decoded together, sequences kept warm and KV cells: as configured, else sized for the
    device and engine."""
    slots = settings.parallel_slots
    if slots:
        reasons.append(f"parallel_slots={slots}: set by PARLEY_PARALLEL_SLOTS")
    elif engine == "llama.cpp":
        # Choices decoded together in one batch: a bigger batch raises throughput until the cores
        # (or the GPU) are busy; past that each stream only slows down.
        # Measured on 2 cores with 16 conversations at once: 16 slots answered later turns ~5x sooner
        # than 8 (no queue) at about the same aggregate speed.
        slots = 16
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
        # Room for every running sequence at a quarter of the context, and at least one whole context.
        kv_tokens = max(settings.context_length, slots * settings.context_length // 4, 8192)
        reasons.append(f"kv_cache_tokens={kv_tokens}: {slots} running sequences at a quarter of the context window")
    return slots, resident, kv_tokens


def _weights(hw: Hardware, settings: InferenceSettings, device: str, engine: str,
             reasons: list[str]) -> tuple[int, str, str]:
    """Where the weights go and in what form: GPU layers, dtype, quantization."""
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
    return gpu_layers, dtype, quantization


def choose(hw: Hardware, settings: InferenceSettings, model_engine: str = "auto") -> EngineSettings:
    """Engine settings for one model. `model_engine` is the catalogue's choice for that model."""
    reasons: list[str] = []
    device, engine = _device_and_engine(hw, settings, model_engine, reasons)
    threads = settings.threads or hw.physical_cores
    reasons.append(
        f"threads={threads}: " + ("set by PARLEY_THREADS" if settings.threads else "one per physical core")
    )

    gpu_layers, dtype, quantization = _weights(hw, settings, device, engine, reasons)
    slots, resident, kv_tokens = _capacity(hw, settings, device, engine, reasons)

    host_mib = min(settings.host_kv_cache_mib, hw.available_memory_mib // 8) if hw.available_memory_mib else \
        settings.host_kv_cache_mib
    reasons.append(f"host_kv_cache_mib={host_mib}: evicted conversations' KV state"
                   + (" (capped at 1/8 of free memory)" if host_mib < settings.host_kv_cache_mib else ""))

    disk_dir = settings.disk_kv_cache_dir if settings.disk_kv_cache_mib else None
    reasons.append(f"disk_kv_cache_mib={settings.disk_kv_cache_mib if disk_dir else 0}: idle conversations' KV state"
                   + (f" in {disk_dir}, kept across restarts" if disk_dir else " is not kept on disk"))

    flash = settings.flash_attention == "on"
    reasons.append(f"flash_attention={settings.flash_attention}: " + (
        "cheaper turns of long conversations (Parley's llama.cpp patch), and seeded answers repeat" if flash else
        "set off by PARLEY_FLASH_ATTENTION: long conversations' turns cost more, and seeded answers do not repeat"))

    reasons.append(f"draft_tokens={settings.draft_tokens}: " + (
        "n-gram drafts from each answer's own prompt and text, verified in the batch step (llama.cpp)"
        if settings.draft_tokens else "speculative decoding off (PARLEY_DRAFT_TOKENS=0)"))

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
        fair_share=settings.fair_share,
        kv_cache_tokens=kv_tokens,
        kv_cache_auto=not settings.kv_cache_tokens,
        resident_sequences=resident,
        batch_tokens=settings.batch_tokens,
        host_cache_mib=host_mib,
        disk_cache_dir=disk_dir,
        disk_cache_mib=settings.disk_kv_cache_mib if disk_dir else 0,
        flash_attention=flash,
        draft_tokens=settings.draft_tokens,
        reasons=reasons,
    )
