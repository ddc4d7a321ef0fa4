"""Which models belong on which node: GPU-memory tiers, ``nodes: "auto"``, and the sync plan. Pure.

Tiers (``distribution.tiers``): a node's tier is the one with the largest
``min_gpu_memory_gb`` not above its ``gpu_memory_gb``. A node registered with
its GPU memory gets its tier's models; ``nodes: "auto"`` pulls a model onto the
nodes whose tier lists it. A node without ``gpu_memory_gb`` has no tier.

Sync (``llm-proxy sync``, ``POST /admin/models/sync``) wants on every Ollama node:

- every ``baseline`` model;
- each ``fallback`` model that *fits*: listed by the node's tier or by a lower
  tier (a tier's models are what that much memory can hold, so they fit on
  anything bigger). With no tiers configured every fallback model fits; on a
  node of unknown memory none does, since nothing says it would.

vLLM and other OpenAI-compatible nodes serve one model chosen by activation, so
sync only lists what they serve.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..backends.ollama import normalize
from ..config import DistributionConfig, Tier


def tier_for(tiers: tuple[Tier, ...], gpu_memory_gb: float | None) -> Tier | None:
    if gpu_memory_gb is None:
        return None
    fitting = [t for t in tiers if t.min_gpu_memory_gb <= gpu_memory_gb]
    return max(fitting, key=lambda t: t.min_gpu_memory_gb, default=None)


def tier_models(tiers: tuple[Tier, ...], gpu_memory_gb: float | None) -> tuple[str, ...]:
    tier = tier_for(tiers, gpu_memory_gb)
    return tier.models if tier else ()


def fits(tiers: tuple[Tier, ...], gpu_memory_gb: float | None, model: str) -> bool:
    """Whether ``model`` is listed by the node's tier or a lower one (see the module doc)."""
    if not tiers:
        return True
    if gpu_memory_gb is None:
        return False
    wanted = normalize(model)
    return any(t.min_gpu_memory_gb <= gpu_memory_gb and any(normalize(m) == wanted for m in t.models) for t in tiers)


def auto_nodes(tiers: tuple[Tier, ...], nodes: dict[str, float | None], model: str) -> list[str]:
    """Nodes (name -> gpu_memory_gb) whose own tier lists ``model``."""
    wanted = normalize(model)
    return [n for n, gpu in nodes.items() if any(normalize(m) == wanted for m in tier_models(tiers, gpu))]


@dataclass
class NodeState:
    """What a node holds, as collected for a sync or a manifest."""

    name: str
    kind: str
    url: str
    gpu_memory_gb: float | None = None
    reachable: bool = True
    error: str | None = None
    models: list[dict] = field(default_factory=list)  # {model, digest, size, modified_at}

    def has(self, model: str) -> bool:
        wanted = normalize(model)
        return any(normalize(m["model"]) == wanted for m in self.models)


@dataclass(frozen=True)
class PlanItem:
    node: str
    model: str
    action: str  # pull (missing), update (installed: pulled again for a newer digest), keep, unreachable
    reason: str

    def as_dict(self) -> dict:
        return {"node": self.node, "model": self.model, "action": self.action, "reason": self.reason}


def wanted(distribution: DistributionConfig, gpu_memory_gb: float | None) -> list[tuple[str, str]]:
    """(model, reason) pairs a node should hold, baseline first, without repeats."""
    out: dict[str, tuple[str, str]] = {}
    for model in distribution.baseline:
        out.setdefault(normalize(model), (model, "baseline"))
    for model in distribution.fallback:
        if fits(distribution.tiers, gpu_memory_gb, model):
            out.setdefault(normalize(model), (model, "fallback"))
    return list(out.values())


def plan_sync(distribution: DistributionConfig, nodes: list[NodeState], *, skip_existing: bool) -> list[PlanItem]:
    plan = []
    for node in nodes:
        if node.kind != "ollama":
            continue
        for model, reason in wanted(distribution, node.gpu_memory_gb):
            if not node.reachable:
                plan.append(PlanItem(node.name, model, "unreachable", f"{reason}; node not answering: {node.error}"))
            elif not node.has(model):
                plan.append(PlanItem(node.name, model, "pull", f"{reason}; not installed"))
            elif skip_existing:
                plan.append(PlanItem(node.name, model, "keep", f"{reason}; installed"))
            else:
                plan.append(PlanItem(node.name, model, "update", f"{reason}; installed, checked for a newer version"))
    return plan
