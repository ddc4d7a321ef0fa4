"""Model management for the simulated Ollama node: tags, show, ps, delete, copy, loaded models.

Kept apart from generation so each module stays readable; :class:`SimOllama`
mixes it in and owns the state it uses (``models``, ``_loaded``, ``_modified``).
Pulls live in :mod:`.ollama_pull`.
"""

from __future__ import annotations

import dataclasses
import time

from starlette.requests import Request
from starlette.responses import Response

from .behavior import ModelSpec
from .core import ORJSONResponse, request_json
from .ollama_wire import (
    FOREVER_S,
    JSON,
    KEEP_ALIVE_DEFAULT_S,
    bind_error,
    canonical_name,
    details,
    display_name,
    error,
    parameter_count,
    parse_keep_alive,
    rfc3339,
    show_template,
)


class OllamaModels:
    """The installed-model registry and its endpoints."""

    models: list[ModelSpec]
    _loaded: dict[str, float]  # canonical name -> expiry (epoch seconds)
    _modified: dict[str, int]  # canonical name -> modified_at (epoch ns)

    # ----------------------------------------------------------- model registry

    def find(self, name: str) -> ModelSpec | None:
        """The installed model ``name`` resolves to (``x`` means ``x:latest``), or None."""
        wanted = canonical_name(name)
        return next((m for m in list(self.models) if canonical_name(m.name) == wanted), None)

    def _modified_ns(self, spec: ModelSpec) -> int:
        return self._modified.setdefault(canonical_name(spec.name), time.time_ns())

    def _mark_loaded(self, spec: ModelSpec, keep_alive: float | None) -> None:
        seconds = KEEP_ALIVE_DEFAULT_S if keep_alive is None else keep_alive
        self._loaded[canonical_name(spec.name)] = time.time() + (FOREVER_S if seconds < 0 else seconds)

    def _unload(self, spec: ModelSpec) -> None:
        self._loaded.pop(canonical_name(spec.name), None)

    # ----------------------------------------------------------- loaded models (Python API)

    def loaded_models(self) -> dict[str, float]:
        """Models ``/api/ps`` lists now: display name -> expiry (epoch seconds)."""
        now = time.time()
        return {
            display_name(spec.name): expires
            for spec in list(self.models)
            if (expires := self._loaded.get(canonical_name(spec.name))) is not None and expires > now
        }

    def load(self, name: str, keep_alive: float | str | None = None) -> None:
        """Load an installed model as a request with this ``keep_alive`` would (default 5m; negative: forever)."""
        spec = self.find(name)
        if spec is None:
            raise KeyError(f"model '{name}' not found")
        self._mark_loaded(spec, parse_keep_alive(keep_alive))

    def unload(self, name: str) -> None:
        spec = self.find(name)
        if spec is not None:
            self._unload(spec)

    def _read(self, request: Request, struct: str) -> tuple[dict | None, Response | None]:
        body, parse_error = request_json(request)
        if parse_error is not None:
            return None, error(400, parse_error)
        if body is None:
            return None, error(400, "missing request body")
        if not isinstance(body, dict):
            return None, error(400, bind_error(body, struct))
        return body, None

    # ----------------------------------------------------------- endpoints

    async def _tags(self, request: Request) -> Response:
        rows = []
        for spec in list(self.models):
            shown = display_name(spec.name)
            rows.append(
                (
                    self._modified_ns(spec),
                    {
                        "name": shown,
                        "model": shown,
                        "modified_at": rfc3339(self._modified_ns(spec)),
                        "size": spec.size,
                        "digest": spec.digest,
                        "details": details(spec),
                    },
                )
            )
        rows.sort(key=lambda row: row[0], reverse=True)  # most recently modified first, like Ollama
        return ORJSONResponse({"models": [row for _, row in rows]}, media_type=JSON)

    async def _ps(self, request: Request) -> Response:
        now = time.time()
        running = []
        for spec in list(self.models):
            expires = self._loaded.get(canonical_name(spec.name))
            if expires is None or expires <= now:
                continue
            shown = display_name(spec.name)
            running.append(
                (
                    expires,
                    {
                        "name": shown,
                        "model": shown,
                        "size": spec.size,
                        "digest": spec.digest,
                        "details": details(spec),
                        "expires_at": rfc3339(int(expires * 1e9)),
                        "size_vram": spec.size,
                        "context_length": spec.context_length,
                    },
                )
            )
        running.sort(key=lambda row: row[0], reverse=True)
        return ORJSONResponse({"models": [row for _, row in running]}, media_type=JSON)

    async def _show(self, request: Request) -> Response:
        body, failure = self._read(request, "ShowRequest")
        if failure:
            return failure
        name = body.get("model") or body.get("name")
        if not name:
            return error(400, "model is required")
        spec = self.find(str(name))
        if spec is None:
            return error(404, f"model '{name}' not found")
        template = show_template(spec)
        stops = '"<end_of_turn>"' if not spec.supports_system_role else '"<|eot_id|>"'
        parameters = f"{'stop':<30} {stops}\n{'temperature':<30} 0.6"
        modelfile = (
            f'# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this, replace FROM with:\n'
            f"# FROM {display_name(spec.name)}\n\nFROM /root/.ollama/models/blobs/sha256-{spec.digest}\n"
            f'TEMPLATE """{template}"""\nPARAMETER stop {stops}\nPARAMETER temperature 0.6\n'
        )
        width = spec.embedding_dim if spec.has("embedding") else 4096
        model_info = {
            "general.architecture": spec.family,
            "general.file_type": 15,
            "general.parameter_count": parameter_count(spec.parameter_size),
            "general.quantization_version": 2,
            f"{spec.family}.context_length": spec.context_length,
            f"{spec.family}.embedding_length": width,
            f"{spec.family}.block_count": 32,
        }
        return ORJSONResponse(
            {
                "license": "",
                "modelfile": modelfile,
                "parameters": parameters,
                "template": template,
                "details": details(spec),
                "model_info": model_info,
                "capabilities": list(spec.capabilities),
                "modified_at": rfc3339(self._modified_ns(spec)),
            },
            media_type=JSON,
        )

    async def _delete(self, request: Request) -> Response:
        body, failure = self._read(request, "DeleteRequest")
        if failure:
            return failure
        name = body.get("model") or body.get("name") or ""
        if not name:
            return error(400, f'name "{name}" is invalid')
        spec = self.find(name)
        if spec is None:
            return error(404, f"model '{name}' not found")
        self.models[:] = [m for m in self.models if m is not spec]
        self._unload(spec)
        self._forget_blobs(spec.name)
        return Response(status_code=200)

    async def _copy(self, request: Request) -> Response:
        body, failure = self._read(request, "CopyRequest")
        if failure:
            return failure
        source, destination = body.get("source") or "", body.get("destination") or ""
        if not destination:
            return error(400, f'destination "{destination}" is invalid')
        spec = self.find(source) if source else None
        if spec is None:
            return error(404, f'model "{source}" not found')
        existing = self.find(destination)
        if existing is not None:
            self.models[:] = [m for m in self.models if m is not existing]
        self.models.append(dataclasses.replace(spec, name=display_name(destination)))
        self._modified[canonical_name(destination)] = time.time_ns()
        return Response(status_code=200)
