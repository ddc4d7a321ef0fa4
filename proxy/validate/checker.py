"""The one checker: small declarative specs of JSON values, and the walk that reports the first problem.

A spec is built once, at import time, and describes what a field may hold. The walk
builds no path strings while a body is fine: a problem raises :class:`Problem`, each
enclosing object or array adds its key or index as the exception passes through,
and only then is the path (``messages[2].content[0].image_url``) put together.

``null`` for an optional field means "absent", as in OpenAI's API (the translators
and the cache treat None the same way); ``null`` for a required field, or as an
array item, is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import InvalidRequest


class Problem(Exception):
    """What is wrong, and where, relative to the value being checked (segments innermost first)."""

    __slots__ = ("head", "tail", "segments")

    def __init__(self, head: str, tail: str) -> None:
        # The message is head + path + tail: every message names the path exactly once.
        self.head = head
        self.tail = tail
        self.segments: list[str | int] = []

    def path(self) -> str:
        out = ""
        for segment in reversed(self.segments):
            if isinstance(segment, int):
                out += f"[{segment}]"
            else:
                out += f".{segment}" if out else segment
        return out

    def error(self) -> InvalidRequest:
        path = self.path()
        return InvalidRequest(f"{self.head}{path}{self.tail}", param=path or None)


def json_type(value) -> str:
    """OpenAI's wording for a value's JSON type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# orjson refuses to encode anything nested deeper than 254 levels, and the proxy re-encodes every
# body (cache key, the backend's request): free-form parts (JSON schemas, unknown fields) get a bound.
MAX_DEPTH = 64


def _too_deep(value, limit: int = MAX_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def check_depth(value) -> None:
    if isinstance(value, (dict, list)) and _too_deep(value):
        raise Problem("Invalid '", f"': nested more than {MAX_DEPTH} levels deep.")


def wrong_type(what: str, value) -> Problem:
    return Problem("Invalid type for '", f"': expected {what}, but got {json_type(value)}.")


def missing() -> Problem:
    return Problem("Missing required parameter: '", "'.")


class Spec:
    """What one JSON value may be. ``what`` names it in messages; ``kinds`` are the Python types it takes."""

    __slots__ = ("what", "kinds")
    what: str
    kinds: tuple[type, ...]

    def check(self, value) -> None:
        raise NotImplementedError

    def accepts_kind(self, value) -> bool:
        return isinstance(value, self.kinds) and not (isinstance(value, bool) and bool not in self.kinds)


class Anything(Spec):
    __slots__ = ()

    def __init__(self) -> None:
        self.what, self.kinds = "any value", (object,)

    def check(self, value) -> None:
        check_depth(value)


class Bool(Spec):
    __slots__ = ()

    def __init__(self) -> None:
        self.what, self.kinds = "a boolean", (bool,)

    def check(self, value) -> None:
        if value is not True and value is not False:
            raise wrong_type(self.what, value)


class Str(Spec):
    __slots__ = ("choices", "nonempty", "_listed")

    def __init__(self, choices: tuple[str, ...] = (), nonempty: bool = False) -> None:
        self.what, self.kinds = "a string", (str,)
        self.choices = frozenset(choices)
        self._listed = ", ".join(choices)
        self.nonempty = nonempty

    def check(self, value) -> None:
        if not isinstance(value, str):
            raise wrong_type(self.what, value)
        if self.choices and value not in self.choices:
            raise Problem("Invalid value for '", f"': expected one of {self._listed}, but got {value[:80]!r}.")
        if self.nonempty and not value:
            raise Problem("Invalid '", "': the string must not be empty.")


class _Number(Spec):
    __slots__ = ("low", "high")

    def __init__(self, low: float | None, high: float | None) -> None:
        self.low, self.high = low, high

    def bounds(self, value) -> None:
        low, high = self.low, self.high
        if low is not None and high is not None:
            if not low <= value <= high:
                raise Problem("Invalid '", f"': {value} is not between {low:g} and {high:g}.")
        elif low is not None and value < low:
            raise Problem("Invalid '", f"': must be at least {low:g}.")
        elif high is not None and value > high:
            raise Problem("Invalid '", f"': must be at most {high:g}.")


class Int(_Number):
    __slots__ = ()

    def __init__(self, low: int | None = None, high: int | None = None) -> None:
        super().__init__(low, high)
        self.what, self.kinds = "an integer", (int,)

    def check(self, value) -> None:
        # bool is an int in Python, not in JSON; 2.0 is a decimal number in JSON terms
        if not isinstance(value, int) or isinstance(value, bool):
            raise wrong_type(self.what, value)
        self.bounds(value)


class Num(_Number):
    __slots__ = ()

    def __init__(self, low: float | None = None, high: float | None = None) -> None:
        super().__init__(low, high)
        self.what, self.kinds = "a number", (int, float)

    def check(self, value) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise wrong_type(self.what, value)
        self.bounds(value)


class Arr(Spec):
    __slots__ = ("item", "min_len")

    def __init__(self, item: Spec, min_len: int = 0, what: str | None = None) -> None:
        self.what = what or f"an array of {_plural(item.what)}"
        self.kinds = (list,)
        self.item, self.min_len = item, min_len

    def check(self, value) -> None:
        if not isinstance(value, list):
            raise wrong_type(self.what, value)
        if len(value) < self.min_len:
            raise Problem("Invalid '", f"': empty array. Expected an array with minimum length {self.min_len}.")
        item = self.item
        index = 0
        try:
            for index, element in enumerate(value):  # noqa: B007 - index names the failing element
                if element is None:
                    raise wrong_type(item.what, None)
                item.check(element)
        except Problem as problem:
            problem.segments.append(index)
            raise


class Obj(Spec):
    """An object with known fields; unknown keys pass (the backend adapter decides about those)."""

    __slots__ = ("fields", "required")

    def __init__(self, fields: Mapping[str, Spec], required: tuple[str, ...] = (), what: str = "an object") -> None:
        self.what, self.kinds = what, (dict,)
        self.fields = dict(fields)
        self.required = required

    def check(self, value) -> None:
        if not isinstance(value, dict):
            raise wrong_type(self.what, value)
        self.fields_of(value)

    def fields_of(self, value: dict) -> None:
        fields = self.fields
        key = ""
        try:
            for key in self.required:
                if value.get(key) is None:
                    raise missing()
            for key, field in value.items():  # noqa: B007 - key names the failing field
                spec = fields.get(key)
                if spec is not None:
                    if field is not None:
                        spec.check(field)
                elif isinstance(field, (dict, list)):  # unknown: passes, but must stay encodable
                    check_depth(field)
        except Problem as problem:
            problem.segments.append(key)
            raise


class Map(Spec):
    """An object whose keys are free and whose values all follow one spec (``metadata``, ``logit_bias``)."""

    __slots__ = ("value",)

    def __init__(self, value: Spec) -> None:
        self.what, self.kinds = f"an object of {_plural(value.what)}", (dict,)
        self.value = value

    def check(self, value) -> None:
        if not isinstance(value, dict):
            raise wrong_type(self.what, value)
        spec = self.value
        key = ""
        try:
            for key, field in value.items():  # noqa: B007
                if field is None:
                    raise wrong_type(spec.what, None)
                spec.check(field)
        except Problem as problem:
            problem.segments.append(key)
            raise


class Tagged(Obj):
    """An object whose ``tag`` field picks its shape (content parts by ``type``, messages by ``role``).

    With ``closed``, an unknown tag is refused; otherwise it passes with only the tag checked
    (a vLLM may know content part types we do not, an Ollama adapter refuses them by name).
    """

    __slots__ = ("tag", "variants", "closed", "_tag_spec")

    def __init__(self, tag: str, variants: Mapping[str, Obj], closed: bool = True, what: str = "an object") -> None:
        super().__init__({}, (tag,), what)
        self.tag, self.variants, self.closed = tag, dict(variants), closed
        self._tag_spec = Str(tuple(variants)) if closed else Str()

    def fields_of(self, value: dict) -> None:
        kind = value.get(self.tag)
        try:
            if kind is None:
                raise missing()
            self._tag_spec.check(kind)
        except Problem as problem:
            problem.segments.append(self.tag)
            raise
        variant = self.variants.get(kind)
        if variant is not None:
            variant.fields_of(value)


class OneOf(Spec):
    """A value of one of several JSON types (``stop``: a string or an array); picked by the value's type."""

    __slots__ = ("options", "_by_type")

    def __init__(self, *options: Spec, what: str | None = None) -> None:
        self.options = options
        self.what = what or " or ".join(o.what for o in options)
        self.kinds = tuple(k for o in options for k in o.kinds)
        # Parsed JSON holds exactly these Python types, so the value's type picks the option in one lookup.
        self._by_type: dict[type, Spec] = {}
        for option in options:
            for kind in option.kinds:
                self._by_type.setdefault(kind, option)

    def check(self, value) -> None:
        option = self._by_type.get(type(value))
        if option is None:
            raise wrong_type(self.what, value)
        option.check(value)


class ArrayByFirst(Spec):
    """An array whose items all take the shape of its first (``input``: strings, token ids, or arrays of them).

    Mixed arrays (``[1, "a"]``) are refused at the first item that differs.
    """

    __slots__ = ("shapes", "min_len")

    def __init__(self, *shapes: Arr, min_len: int = 1, what: str | None = None) -> None:
        self.shapes = shapes
        self.min_len = min_len
        self.what = what or " or ".join(s.what for s in shapes)
        self.kinds = (list,)

    def check(self, value) -> None:
        if not isinstance(value, list):
            raise wrong_type(self.what, value)
        if len(value) < self.min_len:
            raise Problem("Invalid '", f"': empty array. Expected an array with minimum length {self.min_len}.")
        first = value[0] if value else None
        for shape in self.shapes:
            if first is None or shape.item.accepts_kind(first):
                shape.check(value)
                return
        problem = wrong_type(_item_what(self.shapes), first)
        problem.segments.append(0)
        raise problem


def _item_what(shapes: tuple[Arr, ...]) -> str:
    return " or ".join(s.item.what for s in shapes)


def _plural(what: str) -> str:
    for article in ("an ", "a "):
        if what.startswith(article):
            what = what[len(article) :]
            break
    return what if what.endswith("s") else what + "s"


def check(spec: Obj, body: dict) -> None:
    """Raise :class:`InvalidRequest` for the first problem in ``body``, naming its path."""
    try:
        spec.fields_of(body)
    except Problem as problem:
        raise problem.error() from None
