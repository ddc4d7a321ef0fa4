"""One installable model, and the estimates made where a source does not say.

Pure: no I/O. The sources (:mod:`.sources`) turn what they read into
:class:`Entry` objects; :func:`fits` compares an entry with the nodes' GPUs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

GIB = 1 << 30

# Bytes per weight for the quantisations the sources name. Ollama's default tags are Q4_K_M, whose
# blocks average about 4.85 bits a weight (llama3.1:8b: 8.03e9 weights in 4.92e9 bytes).
_BYTES_PER_WEIGHT = {
    "F32": 4.0, "FP32": 4.0, "BF16": 2.0, "F16": 2.0, "FP16": 2.0,
    "FP8": 1.0, "F8_E4M3": 1.0, "F8_E5M2": 1.0, "Q8_0": 1.0625, "INT8": 1.0,
    "Q6_K": 0.82, "Q5_K_M": 0.71, "Q4_K_M": 0.606, "Q4_0": 0.5625, "MXFP4": 0.53,
    "AWQ": 0.5625, "GPTQ": 0.5625, "INT4": 0.5, "4BIT": 0.5,
}  # fmt: skip
DEFAULT_OLLAMA_QUANT = "Q4_K_M"
# Embedding models in the Ollama library ship at F16.
DEFAULT_EMBEDDING_QUANT = "F16"

# Memory a loaded model needs beyond its weights: KV cache at a default context, activations and the
# runtime's own buffers. A fifth of the weights plus half a GiB is near what Ollama reports in
# /api/ps for a 4k context (llama3.1:8b: 4.9 GB of weights, about 6.3 GB loaded). vLLM takes
# gpu_memory_utilization of the GPU whatever the model, so for it this is the least that works.
MEMORY_FACTOR = 1.2
MEMORY_OVERHEAD = GIB // 2

_PARAMS = re.compile(r"^(?:(\d+)x)?(?:e)?(\d+(?:\.\d+)?)([kmbt])$", re.IGNORECASE)
_SCALE = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


@dataclass(frozen=True)
class Entry:
    name: str  # what to pull: "llama3.1:8b", "Qwen/Qwen3-8B"
    source: str  # "ollama" or "huggingface"
    size: int | None = None  # bytes to download
    parameters: int | None = None
    quantization: str | None = None
    capabilities: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    description: str = ""
    required_memory: int | None = None  # bytes; None: estimated from size (see with_estimates)
    size_estimated: bool = False
    memory_estimated: bool = False

    def with_estimates(self) -> Entry:
        """The size from parameters and quantisation, and the memory from the size, where not known."""
        entry = self
        if entry.size is None and entry.parameters:
            per_weight = _BYTES_PER_WEIGHT.get((entry.quantization or "").upper())
            if per_weight is not None:
                entry = replace(entry, size=math.ceil(entry.parameters * per_weight), size_estimated=True)
        if entry.required_memory is None and entry.size is not None:
            entry = replace(entry, required_memory=math.ceil(entry.size * MEMORY_FACTOR) + MEMORY_OVERHEAD,
                            memory_estimated=True)  # fmt: skip
        return entry

    def as_dict(self, fits: dict[str, bool | None]) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "size": self.size,
            "required_memory": self.required_memory,
            "parameters": self.parameters,
            "quantization": self.quantization,
            "capabilities": list(self.capabilities),
            "tags": list(self.tags),
            "description": self.description,
            "estimated": {"size": self.size_estimated, "required_memory": self.memory_estimated},
            "fits": fits,
        }


def parameters_of(label: str) -> int | None:
    """A parameter count from a size label: "8b", "0.6b", "137m", "8x7b" (experts), "e2b" (effective)."""
    match = _PARAMS.match(label.strip())
    if not match:
        return None
    experts = int(match.group(1) or 1)
    return int(experts * float(match.group(2)) * _SCALE[match.group(3).lower()])


def bytes_per_weight(dtype: str) -> float | None:
    return _BYTES_PER_WEIGHT.get(dtype.upper())


def gpu_bytes(gpu_memory_gb: float | None) -> int | None:
    """A node's ``gpu_memory_gb`` in bytes. Read as GiB, the unit nvidia-smi's MiB figures add up to."""
    return None if gpu_memory_gb is None else int(gpu_memory_gb * GIB)


def fits(entry: Entry, nodes: dict[str, int | None]) -> dict[str, bool | None]:
    """For each node (name -> GPU bytes), whether the entry's required memory fits; None when either is unknown."""
    need = entry.required_memory
    return {name: None if need is None or have is None else need <= have for name, have in nodes.items()}


def matches(entry: Entry, query: str) -> bool:
    """The catalog's q: a case-insensitive substring of the name."""
    return not query or query.casefold() in entry.name.casefold()
