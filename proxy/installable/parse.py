"""What the sources answer, read into entries. Pure: bytes in, :class:`.Entry` objects out.

- The Ollama library has no JSON API. Its search page (``/search?q=``) marks each model with
  ``x-test-*`` attributes (``x-test-model`` on the item, ``x-test-search-response-title``,
  ``x-test-capability``, ``x-test-size``), which its own tests rely on; those are read here and
  nothing else of the layout.
- The Hugging Face API (``/api/models?search=&filter=&expand=safetensors...``) answers a JSON
  list of models with ``id``, ``pipeline_tag``, ``tags`` and, for safetensors repositories,
  ``safetensors.parameters`` (weight count per dtype), from which the size follows.
- The shipped file: ``{"version": 1, "models": [{name, source, size, ...}]}``.
"""

from __future__ import annotations

from html.parser import HTMLParser

import orjson

from .entry import DEFAULT_EMBEDDING_QUANT, DEFAULT_OLLAMA_QUANT, Entry, bytes_per_weight, parameters_of

SOURCES = ("ollama", "huggingface")


class SourceAnswerError(ValueError):
    """A source answered something that is not what it should (not HTML with models, not a JSON list)."""


# --- Ollama library -----------------------------------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _LibraryPage(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.models: list[dict] = []
        self._depth = 0
        self._model_depth: int | None = None  # depth of the open x-test-model element
        self._field: str | None = None  # the x-test-* element whose text is being read
        self._field_depth = 0
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        names = {k for k, _ in attrs}
        if tag not in _VOID:
            self._depth += 1
        if "x-test-model" in names:
            self._model_depth = self._depth
            self.models.append({"name": "", "capabilities": [], "sizes": [], "description": ""})
            return
        if self._model_depth is None or self._field is not None:
            return
        for field in ("x-test-search-response-title", "x-test-capability", "x-test-size"):
            if field in names:
                self._field, self._field_depth, self._text = field, self._depth, []
                return
        if tag == "p" and not self.models[-1]["description"]:
            self._field, self._field_depth, self._text = "description", self._depth, []

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        if self._field is not None and self._depth == self._field_depth:
            text = " ".join("".join(self._text).split())
            model = self.models[-1]
            if self._field == "x-test-search-response-title":
                model["name"] = text
            elif self._field == "x-test-capability":
                model["capabilities"].append(text)
            elif self._field == "x-test-size":
                model["sizes"].append(text)
            else:
                model["description"] = text
            self._field = None
        if self._model_depth is not None and self._depth == self._model_depth:
            self._model_depth = None
        self._depth -= 1

    def handle_data(self, data):
        if self._field is not None:
            self._text.append(data)


def ollama_library(body: bytes, known: dict[str, Entry]) -> list[Entry]:
    """Entries from the library's search page: one per size tag ("gemma3:4b"), or the bare name.

    ``known`` (the shipped file's Ollama entries, by name) supplies exact sizes and quantisations
    for the tags it has; the others are estimated from the size label.
    """
    page = _LibraryPage()
    try:
        page.feed(body.decode("utf-8", errors="replace"))
        page.close()
    except Exception as exc:  # html.parser is lenient; anything it still raises means this is no page
        raise SourceAnswerError(f"not an HTML page: {exc}") from None
    if not page.models and b"<" not in body[:1024]:
        raise SourceAnswerError("not an HTML page")
    entries: list[Entry] = []
    for model in page.models:
        name = model["name"]
        if not name:
            continue
        capabilities = tuple(c.lower() for c in model["capabilities"] if c.lower() != "cloud")
        sizes = [s.lower() for s in model["sizes"] if s.lower() != "cloud"]
        if not sizes and "cloud" in (c.lower() for c in model["capabilities"]):
            continue  # runs on ollama.com only: nothing to install
        quant = DEFAULT_EMBEDDING_QUANT if "embedding" in capabilities else DEFAULT_OLLAMA_QUANT
        for size in sizes or ["latest"]:
            full = f"{name}:{size}"
            shipped = known.get(full) or (known.get(f"{name}:latest") if size == "latest" else None)
            if shipped is not None:
                entries.append(Entry(full, "ollama", shipped.size, shipped.parameters, shipped.quantization,
                                     capabilities or shipped.capabilities, tuple(sizes) or shipped.tags,
                                     model["description"] or shipped.description))  # fmt: skip
                continue
            params = parameters_of(size)
            entries.append(Entry(full, "ollama", None, params, quant if params else None, capabilities,
                                 tuple(sizes), model["description"]))  # fmt: skip
    return entries


# --- Hugging Face -------------------------------------------------------------------------------

_PIPELINE_CAPABILITIES = {
    "text-generation": ("completion",),
    "text2text-generation": ("completion",),
    "image-text-to-text": ("completion", "vision"),
    "feature-extraction": ("embedding",),
    "sentence-similarity": ("embedding",),
}
# Tags that name how the weights are quantised, in the order they are trusted.
_QUANT_TAGS = (("awq", "AWQ"), ("gptq", "GPTQ"), ("fp8", "FP8"), ("bitsandbytes", "4BIT"), ("4-bit", "4BIT"),
               ("8-bit", "INT8"), ("mxfp4", "MXFP4"))  # fmt: skip

# Integer dtypes hold packed weights (GPTQ/AWQ's I32) or indices: their width is what is stored.
_PACKED = {"I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _hf_quantization(dtypes: dict[str, int], tags: set[str]) -> str | None:
    for tag, name in _QUANT_TAGS:
        if tag in tags:
            return name
    if not dtypes:
        return None
    return max(dtypes.items(), key=lambda kv: kv[1])[0].upper()


def _hf_entry(raw: dict) -> Entry | None:
    name = raw.get("id") or raw.get("modelId")
    if not isinstance(name, str) or not name:
        return None
    tags = [t for t in raw.get("tags") or [] if isinstance(t, str)]
    tagset = {t.lower() for t in tags}
    pipeline = raw.get("pipeline_tag") if isinstance(raw.get("pipeline_tag"), str) else None
    capabilities = _PIPELINE_CAPABILITIES.get(pipeline or "", ())
    if "conversational" in tagset and "completion" not in capabilities:
        capabilities = ("completion", *capabilities)
    safetensors = raw.get("safetensors") if isinstance(raw.get("safetensors"), dict) else {}
    counts = safetensors.get("parameters") if isinstance(safetensors.get("parameters"), dict) else {}
    dtypes = {str(k): v for k, v in counts.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 0}
    size = None
    if dtypes and all(bytes_per_weight(d) is not None or d.upper() in _PACKED for d in dtypes):
        size = round(sum(n * (bytes_per_weight(d) or _PACKED[d.upper()]) for d, n in dtypes.items()))
    total = safetensors.get("total")
    parameters = total if isinstance(total, int) and not isinstance(total, bool) else (sum(dtypes.values()) or None)
    gguf = raw.get("gguf") if isinstance(raw.get("gguf"), dict) else {}
    quantization = _hf_quantization(dtypes, tagset)
    if parameters is None and isinstance(gguf.get("total"), int):
        parameters, quantization = gguf["total"], quantization or DEFAULT_OLLAMA_QUANT
    visible = tuple(t for t in tags if not t.startswith(("region:", "license:", "arxiv:", "base_model:", "dataset:")))
    return Entry(name, "huggingface", size, parameters, quantization, capabilities, visible)


def huggingface_models(body: bytes) -> list[Entry]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise SourceAnswerError(f"not JSON: {exc}") from None
    if not isinstance(data, list):
        raise SourceAnswerError(f"expected a JSON list of models, got {type(data).__name__}")
    return [e for e in (_hf_entry(m) for m in data if isinstance(m, dict)) if e is not None]


# --- the shipped file ---------------------------------------------------------------------------


def catalog_file(body: bytes) -> list[Entry]:
    """The entries of a catalog file; :class:`SourceAnswerError` names the first bad one."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise SourceAnswerError(f"not JSON: {exc}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise SourceAnswerError('expected {"version": 1, "models": [...]}')
    entries = []
    for i, raw in enumerate(models):
        where = f"models[{i}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
            raise SourceAnswerError(f"{where}.name: required (a string)")
        if raw.get("source") not in SOURCES:
            raise SourceAnswerError(f"{where}.source: expected one of {', '.join(SOURCES)}")
        for key in ("size", "parameters", "required_memory"):
            value = raw.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise SourceAnswerError(f"{where}.{key}: expected a whole number of bytes or weights")
        lists = {}
        for key in ("capabilities", "tags"):
            value = raw.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SourceAnswerError(f"{where}.{key}: expected a list of strings")
            lists[key] = tuple(value)
        entries.append(Entry(raw["name"], raw["source"], raw.get("size"), raw.get("parameters"),
                             raw.get("quantization") if isinstance(raw.get("quantization"), str) else None,
                             lists["capabilities"], lists["tags"], str(raw.get("description") or ""),
                             raw.get("required_memory")))  # fmt: skip
    return entries
