"""What each ``/v1`` body may hold: every field the proxy accepts, nested fields included.

OpenAI's fields, the vLLM/Ollama sampling extras, and Ollama's own request fields
sent as extra body fields. Types only (and the ranges OpenAI enforces): whether a
backend can honour a valid field is its adapter's business. Fields not listed pass,
for the adapter to pass through (vLLM) or refuse by name (Ollama).
"""

from __future__ import annotations

from .checker import Anything, Arr, ArrayByFirst, Bool, Int, Map, Num, Obj, OneOf, Str, Tagged

ANY = Anything()
STR = Str()
BOOL = Bool()
INT = Int()
NUM = Num()
OBJ = Obj({})
STRINGS = Arr(STR)

# Ollama's documented option keys and their types; other keys pass through to Ollama untouched.
OLLAMA_OPTIONS = Obj({
    "num_keep": INT, "seed": INT, "num_predict": INT, "top_k": INT, "top_p": NUM, "min_p": NUM,
    "typical_p": NUM, "repeat_last_n": INT, "temperature": NUM, "repeat_penalty": NUM,
    "presence_penalty": NUM, "frequency_penalty": NUM, "penalize_newline": BOOL,
    "stop": OneOf(STR, STRINGS), "num_ctx": INT, "num_batch": INT, "num_gpu": INT, "main_gpu": INT,
    "use_mmap": BOOL, "use_mlock": BOOL, "num_thread": INT, "low_vram": BOOL, "numa": BOOL,
    "mirostat": INT, "mirostat_tau": NUM, "mirostat_eta": NUM, "tfs_z": NUM,
})  # fmt: skip

# Fields every generating endpoint (chat and legacy completions) takes.
SAMPLING = {
    "model": Str(nonempty=True),
    "stream": BOOL,
    "stream_options": Obj({"include_usage": BOOL, "continuous_usage_stats": BOOL}),
    "temperature": Num(0, 2),
    "top_p": Num(0, 1),
    "presence_penalty": Num(-2, 2),
    "frequency_penalty": Num(-2, 2),
    "max_tokens": Int(1),
    "n": Int(1),
    "seed": INT,
    "stop": OneOf(STR, STRINGS, what="a string or an array of strings"),
    "logit_bias": Map(Num(-100, 100)),
    "user": STR,
    "metadata": Map(STR),
    "store": BOOL,
    "service_tier": STR,
    "prompt_cache_key": STR,
    "safety_identifier": STR,
    "task_type": STR,
    # vLLM sampling extras and Ollama fields sent as extra body fields
    "top_k": INT,
    "min_p": NUM,
    "typical_p": NUM,
    "repeat_penalty": NUM,
    "repetition_penalty": NUM,
    "options": OLLAMA_OPTIONS,
    "keep_alive": OneOf(STR, NUM, what="a duration string or a number of seconds"),
    "think": OneOf(BOOL, STR, what="a boolean or a string"),
}

# --- chat ---------------------------------------------------------------------------------------

_IMAGE_URL = Obj({"url": STR, "detail": Str(("auto", "low", "high"))}, required=("url",))

CONTENT_PART = Tagged(
    "type",
    {
        "text": Obj({"text": STR}, required=("text",)),
        # a bare URL string is what some older clients send
        "image_url": Obj({"image_url": OneOf(_IMAGE_URL, STR, what="an object")}, required=("image_url",)),
        "input_audio": Obj(
            {"input_audio": Obj({"data": STR, "format": STR}, required=("data", "format"))}, required=("input_audio",)
        ),  # fmt: skip
        "refusal": Obj({"refusal": STR}, required=("refusal",)),
        "file": Obj({"file": Obj({"file_data": STR, "file_id": STR, "filename": STR})}, required=("file",)),
    },
    closed=False,  # other part types pass: a vLLM may know them (video_url), the Ollama adapter refuses them
    what="a content part object",
)
CONTENT = OneOf(STR, Arr(CONTENT_PART, min_len=1), what="a string or an array of content parts")

TOOL_CALL = Obj(
    {
        "id": STR,
        "type": STR,
        "function": Obj({"name": STR, "arguments": STR}, required=("name",)),
    },
    required=("function",),
)

_SPOKEN = {"content": CONTENT, "name": STR}
MESSAGE = Tagged(
    "role",
    {
        "system": Obj(_SPOKEN, required=("content",)),
        "developer": Obj(_SPOKEN, required=("content",)),
        "user": Obj(_SPOKEN, required=("content",)),
        "assistant": Obj(
            {
                **_SPOKEN,
                "tool_calls": Arr(TOOL_CALL),
                "refusal": STR,
                "reasoning_content": STR,
                "reasoning": STR,
                "audio": Obj({"id": STR}),
                "function_call": Obj({"name": STR, "arguments": STR}),
            }
        ),  # fmt: skip
        "tool": Obj({"content": CONTENT, "tool_call_id": STR}, required=("content", "tool_call_id")),
        "function": Obj({"content": CONTENT, "name": STR}, required=("name",)),
    },
    what="a message object",
)

TOOL = Obj(
    {
        "type": STR,
        "function": Obj(
            {"name": Str(nonempty=True), "description": STR, "parameters": OBJ, "strict": BOOL},
            required=("name",),
        ),
    },
    required=("function",),
)

TOOL_CHOICE = OneOf(
    Str(("none", "auto", "required")),
    Obj({"type": STR, "function": Obj({"name": STR}, required=("name",))}, required=("function",)),
    what="a string or an object",
)

RESPONSE_FORMAT = Tagged(
    "type",
    {
        "text": Obj({}),
        "json_object": Obj({}),
        "json_schema": Obj(
            {"json_schema": Obj({"name": STR, "description": STR, "schema": OBJ, "strict": BOOL})},
            required=("json_schema",),
        ),
    },
)

CHAT = Obj(
    {
        **SAMPLING,
        "messages": Arr(MESSAGE, min_len=1),
        "max_completion_tokens": Int(1),
        "logprobs": BOOL,
        "top_logprobs": Int(0, 20),
        "tools": Arr(TOOL),
        "tool_choice": TOOL_CHOICE,
        "parallel_tool_calls": BOOL,
        "response_format": RESPONSE_FORMAT,
        "reasoning_effort": STR,
        "verbosity": STR,
        "modalities": STRINGS,
        "audio": Obj({"voice": STR, "format": STR}),
        "prediction": Obj({"type": STR, "content": CONTENT}, required=("content",)),
        "web_search_options": OBJ,
        "functions": Arr(
            Obj({"name": Str(nonempty=True), "description": STR, "parameters": OBJ}, required=("name",))
        ),  # fmt: skip
        "function_call": OneOf(STR, Obj({"name": STR}, required=("name",)), what="a string or an object"),
    },
    required=("model", "messages"),
)

# --- legacy completions -------------------------------------------------------------------------

_TOKENS = Arr(INT, what="an array of token ids")
_SOME_TOKENS = Arr(INT, min_len=1, what="an array of token ids")  # an empty one inside a batch is no prompt
PROMPT = OneOf(
    STR,
    ArrayByFirst(STRINGS, _TOKENS, Arr(_SOME_TOKENS), what="an array of strings or token ids"),
    what="a string or an array",
)

COMPLETION = Obj(
    {
        **SAMPLING,
        "prompt": PROMPT,
        "suffix": STR,
        "logprobs": Int(0, 20),
        "echo": BOOL,
        "best_of": Int(1),
        "raw": BOOL,
        "system": STR,
    },
    required=("model", "prompt"),
)

# --- embeddings ---------------------------------------------------------------------------------

_TEXT = Str(nonempty=True)
INPUT = OneOf(
    _TEXT,
    ArrayByFirst(Arr(_TEXT), _TOKENS, Arr(_SOME_TOKENS), what="an array of strings or token ids"),
    what="a string or an array",
)

EMBEDDINGS = Obj(
    {
        "model": Str(nonempty=True),
        "input": INPUT,
        "encoding_format": Str(("float", "base64")),
        "dimensions": Int(1),
        "user": STR,
        "task_type": STR,
        "truncate": BOOL,
        "keep_alive": SAMPLING["keep_alive"],
        "options": OLLAMA_OPTIONS,
    },
    required=("model", "input"),
)
