"""The HTTP contract's request checks, as pure functions (no Ray, no FastAPI, no model).

``POST /recommend`` takes a JSON object::

    {"history": ["id", ...], "k": 10, "exclude": ["id", ...], "diversity": 0.0, "explain": false}

``history`` (required): original item ids, most recent last. ``k`` (default 10, at most ``max_k``),
``exclude`` (ids never to recommend), ``diversity`` (0 = pure relevance .. 1) and ``explain`` (add the
history items behind each recommendation) are optional. Anything else is refused: an unknown field, a
value of the wrong type (``true`` is not a number, ``7`` is not an id), an out-of-range value. Every
refusal is a :class:`RequestError` carrying the HTTP status and a one-line message.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

FIELDS = ("history", "k", "exclude", "diversity", "explain")
OPTIONS = ("exclude", "diversity", "explain")  # what a model may or may not support
DEFAULT_K = 10
_MAX_SHOWN = 60  # characters of an offending value shown in a message


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = " ".join(str(message).split())
        super().__init__(self.message)


@dataclass(frozen=True)
class RecommendRequest:
    history: list[str]
    k: int = DEFAULT_K
    exclude: list[str] = field(default_factory=list)
    diversity: float = 0.0
    explain: bool = False

    def options_used(self) -> list[str]:
        """The options this request sets to something other than their no-op value."""
        used = []
        if self.exclude:
            used.append("exclude")
        if self.diversity != 0.0:
            used.append("diversity")
        if self.explain:
            used.append("explain")
        return used


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def decode_body(body: bytes, max_bytes: int) -> Any:
    """The JSON value of a request body: 413 when it is larger than ``max_bytes``, 400 when it is not
    UTF-8 or not JSON (NaN and Infinity are not JSON either)."""
    if len(body) > max_bytes:
        raise RequestError(413, f"request body of {len(body)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(400, f"request body is not valid UTF-8 (byte offset {err.start})") from None
    if not text.strip():
        raise RequestError(400, "request body is empty; expected a JSON object")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err) or "nested too deeply"
        where = f" at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise RequestError(400, f"request body is not valid JSON: {reason}{where}") from None


def _ids(obj: dict, name: str, max_items: int, required: bool) -> list[str]:
    if name not in obj:
        if required:
            raise RequestError(400, f"{name}: required (a list of item id strings, most recent last)")
        return []
    value = obj[name]
    if not isinstance(value, list):
        raise RequestError(400, f"{name}: expected an array of item id strings, got {_json_type(value)} "
                                f"{_shown(value)}")
    if len(value) > max_items:
        raise RequestError(400, f"{name}: at most {max_items} item ids, got {len(value)}")
    for pos, item in enumerate(value):
        if not isinstance(item, str):
            raise RequestError(400, f"{name}[{pos}]: expected an item id string, got {_json_type(item)} "
                                    f"{_shown(item)}")
    return value


def parse_recommend(obj: Any, cfg) -> RecommendRequest:
    """A checked :class:`RecommendRequest` from a decoded body; ``cfg`` gives ``max_k``, ``max_history``
    and ``default_diversity`` (a :class:`~llmrec_dist.serving.settings.ServeConfig`)."""
    if not isinstance(obj, dict):
        raise RequestError(400, f"expected a JSON object with a history field, got {_json_type(obj)}")
    unknown = [key for key in obj if key not in FIELDS]
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(_shown(key) for key in unknown)}; "
                                f"valid fields: {', '.join(FIELDS)}")
    history = _ids(obj, "history", cfg.max_history, required=True)
    exclude = _ids(obj, "exclude", cfg.max_history, required=False)

    k = obj.get("k", DEFAULT_K)
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or \
            (isinstance(k, float) and not (math.isfinite(k) and k.is_integer())):
        raise RequestError(400, f"k: expected an integer in 1..{cfg.max_k}, got {_json_type(k)} {_shown(k)}")
    k = int(k)
    if not 1 <= k <= cfg.max_k:
        raise RequestError(400, f"k: must be in 1..{cfg.max_k}, got {k}")

    diversity = obj.get("diversity", cfg.default_diversity)
    if isinstance(diversity, bool) or not isinstance(diversity, numbers.Real):
        raise RequestError(400, f"diversity: expected a number in [0, 1], got {_json_type(diversity)} "
                                f"{_shown(diversity)}")
    diversity = float(diversity)
    if not 0.0 <= diversity <= 1.0:
        raise RequestError(400, f"diversity: must be in [0, 1], got {diversity:g}")

    explain = obj.get("explain", False)
    if not isinstance(explain, bool):
        raise RequestError(400, f"explain: expected true or false, got {_json_type(explain)} {_shown(explain)}")
    return RecommendRequest(history=history, k=k, exclude=exclude, diversity=diversity, explain=explain)


def check_supported(request: RecommendRequest, options: dict[str, bool]) -> None:
    """400 when ``request`` sets an option the loaded model's ``recommend`` does not take."""
    missing = [name for name in request.options_used() if not options.get(name)]
    if missing:
        raise RequestError(400, f"{', '.join(missing)} not supported by this model "
                                f"(it supports: {', '.join(n for n in OPTIONS if options.get(n)) or 'none'})")
