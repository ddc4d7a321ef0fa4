"""The admin side's work: nodes, pulls, deletes, activation and sync, as operations that run in the background.

| module | what |
|---|---|
| ``model`` | the :class:`Operation` record and its states |
| ``progress`` | Ollama pull status lines -> bytes, fraction, speed, ETA (pure) |
| ``manager`` | runs operations: limits, cancel, retry, subscribers, persistence |
| ``store`` | operations in the fleet store (:mod:`proxy.store`); leases, interrupted runners |
| ``pulls`` | the pull and delete runners (retries, backoff, window) |
| ``window`` | the ``pulls.window`` time-of-day check |
| ``distribution`` | GPU tiers, ``nodes: "auto"``, the sync plan (pure) |
| ``sync`` | collecting what nodes hold, the manifest, the sync runner |
| ``activate`` | repointing an alias (Ollama preload, vLLM activate_command) |
| ``aliases`` | alias overrides in the fleet store |
| ``registry`` | config and run-time nodes; drain and removal |
| ``audit`` | admin actions in the request history |
| ``fleet`` | all of it wired together from :class:`FleetParts`, as ``services.fleet`` |
| ``schedule`` | ``distribution.schedule``: one sync per firing in the fleet |
| ``cli_sync`` | ``llm-proxy sync``, without a running proxy |
"""

from .fleet import Fleet, FleetParts
from .model import Operation

__all__ = ["Fleet", "FleetParts", "Operation"]
