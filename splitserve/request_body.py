"""A request body, from bytes to plain JSON data the pydantic models can take, or a 400 naming what is wrong.

``json.loads`` accepts things the rest of the server cannot hold, and each used
to surface as a 500: a lone UTF-16 surrogate (``"\\udc00"`` as an escape, or the
raw bytes ``ED A0 80``, which ``json.loads`` decodes with ``surrogatepass``)
passes pydantic and then fails the tokenizer or the UTF-8 encoding of a
response or metric; an integer of more than 4,300 digits raises ``ValueError``
rather than ``JSONDecodeError``; a document nested a thousand deep raises
``RecursionError`` in the parser or later in validation. ``parse_json_body``
refuses all of them with a ``BodyError`` that names the field (its dotted path,
e.g. ``messages.0.content``) or the body as a whole.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

MAX_JSON_DEPTH = 32  # objects and arrays nested deeper are refused (OpenAI bodies need about 6)
_SURROGATE = re.compile("[\ud800-\udfff]")
_SCALARS = frozenset({int, float, bool, type(None)})


class BodyError(ValueError):
    """The body cannot be read as a request; ``param`` names the field when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object of plain, valid Unicode text, nested at most ``MAX_JSON_DEPTH`` deep."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise BodyError(f"request body is nested too deeply: objects and arrays may nest at most {MAX_JSON_DEPTH} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BodyError(f"request body is not valid JSON: {e}") from e
    except ValueError as e:  # an integer beyond the interpreter's digit limit
        raise BodyError(f"request body is not valid JSON: integers may have at most {sys.get_int_max_str_digits()} digits") from e
    if not isinstance(data, dict):
        raise BodyError("request body must be a JSON object")
    check_json_values(data)
    return data


def check_json_values(data: Any) -> None:
    """Refuse lone surrogates in any key or string and nesting deeper than ``MAX_JSON_DEPTH`` (iterative: no recursion)."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise _surrogate_error(path)
            continue
        if isinstance(value, (dict, list)):
            if len(path) >= MAX_JSON_DEPTH:
                raise BodyError(
                    f"{_dotted(path) or 'body'}: nested too deeply; objects and arrays may nest at most {MAX_JSON_DEPTH} levels",
                    _dotted(path) or None,
                )
            if isinstance(value, dict):
                for key, item in value.items():
                    if _SURROGATE.search(key):
                        raise _surrogate_error(path)
                    if isinstance(item, (str, dict, list)):
                        stack.append((item, (*path, key)))
            elif not _SCALARS.issuperset(map(type, value)):  # a long list of token ids is skipped at C speed
                stack.extend((item, (*path, i)) for i, item in enumerate(value) if isinstance(item, (str, dict, list)))


def _surrogate_error(path: tuple[Any, ...]) -> BodyError:
    where = _dotted(path) or "body"
    return BodyError(
        f"{where}: contains a lone UTF-16 surrogate (U+D800-U+DFFF), which is not valid Unicode text; send UTF-8 text",
        _dotted(path) or None,
    )


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)
