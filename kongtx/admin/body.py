"""Admin request bodies: JSON, urlencoded and multipart forms, Kong's key syntax.

:func:`decode_body` is the boundary: it turns the raw body of a ``POST``,
``PUT`` or ``PATCH`` into the plain dict the schema validates, or raises a
Kong-shaped error.  Form values are strings, so they are coerced by the
entity's field types (:func:`infer`), exactly where Kong does it
(``kong/api/arguments.lua``); JSON values are never coerced.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qsl

from kongtx import errors
from kongtx.schema.entity import Entity
from kongtx.schema.typedefs import Field

__all__ = ["decode_body", "parse_form_pairs", "nest_pairs", "infer", "METHODS_WITH_BODY"]

METHODS_WITH_BODY = frozenset([b"POST", b"PUT", b"PATCH"])

_KEY_PART = re.compile(r"\.([^\[.]+)|\[([^\]]*)\]")

Segment = Union[str, int, None]  # str: map key, int: 1-based index, None: append


def split_key(name: str) -> List[Segment]:
    """``service.name`` -> ``["service", "name"]``; ``paths[]`` -> ``["paths", None]``.

    ``paths[2]`` gives ``["paths", 2]``; ``headers.x-foo[]`` gives
    ``["headers", "x-foo", None]``.  A key with no ``.``/``[`` is one segment.
    """
    first = None
    for index, char in enumerate(name):
        if index > 0 and char in ".[":
            first = index
            break
    if first is None:
        return [name]
    head, rest = name[:first], name[first:]
    segments: List[Segment] = [head]
    position = 0
    for match in _KEY_PART.finditer(rest):
        if match.start() != position:
            return [name]
        position = match.end()
        if match.group(1) is not None:
            segments.append(match.group(1))
        else:
            inner = match.group(2)
            if inner == "":
                segments.append(None)
            elif inner.isdigit():
                segments.append(int(inner))
            else:
                segments.append(inner)
    if position != len(rest):
        return [name]
    return segments


class _Node(dict):  # type: ignore[type-arg]
    """An intermediate container; becomes a list if all its keys are indexes."""


def nest_pairs(pairs: Iterable[Tuple[str, Any]]) -> Dict[str, Any]:
    """Build nested dicts/lists from ``(key, value)`` pairs in Kong's key syntax.

    A plain key given several times becomes a list (``paths=/a&paths=/b``).
    """
    root = _Node()
    for key, value in pairs:
        segments = split_key(key)
        node = root
        for position, segment in enumerate(segments):
            last = position == len(segments) - 1
            if segment is None:
                ints = [k for k in node if isinstance(k, int)]
                segment = (max(ints) if ints else 0) + 1
            if last:
                if segment in node and not isinstance(node[segment], _Node):
                    existing = node[segment]
                    if isinstance(existing, _Multi):
                        existing.append(value)
                    else:
                        node[segment] = _Multi([existing, value])
                else:
                    node[segment] = value
            else:
                child = node.get(segment)
                if not isinstance(child, _Node):
                    child = _Node()
                    node[segment] = child
                node = child
    return _finish(root)


class _Multi(list):  # type: ignore[type-arg]
    """A value given several times under the same plain key."""


def _finish(value: Any) -> Any:
    if isinstance(value, _Node):
        if value and all(isinstance(k, int) for k in value):
            return [_finish(value[k]) for k in sorted(value)]
        return {str(k): _finish(v) for k, v in value.items()}
    if isinstance(value, _Multi):
        return [_finish(v) for v in value]
    return value


def parse_form_pairs(body: bytes) -> List[Tuple[str, str]]:
    """``application/x-www-form-urlencoded`` pairs, blank values kept."""
    text = body.decode("utf-8", errors="replace")
    return parse_qsl(text, keep_blank_values=True)


def parse_multipart(content_type: str, body: bytes) -> List[Tuple[str, str]]:
    """``multipart/form-data`` fields as ``(name, text)`` pairs, in order."""
    if not body.strip():
        return []
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        return []
    pairs = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        charset = part.get_content_charset() or "utf-8"
        pairs.append((str(name), payload.decode(charset, errors="replace")))
    return pairs


# -- coercion by field type -------------------------------------------------------


def infer(
    args: Dict[str, Any], entity: Entity, context: Optional[Mapping[str, Any]] = None
) -> Dict[str, Any]:
    """Coerce form strings by *entity*'s field types (Kong's ``arguments.infer``).

    Fields come from the subschema the input selects (a plugin's ``config`` by
    its ``name``); *context* is the stored row a PATCH applies to, so a patch
    without ``name`` still finds its plugin's fields.
    """
    row: Dict[str, Any] = dict(context or {})
    row.update(args)
    for name in list(args):
        fdef = entity.field(name, row)
        if fdef is None:
            shorthand = entity.shorthand(name)
            fdef = shorthand.field if shorthand is not None else None
        if fdef is not None:
            args[name] = infer_value(args[name], fdef, entity)
    return args


def infer_value(value: Any, field: Field, entity: Optional[Entity] = None) -> Any:
    """One value: ``""`` -> null, numbers, booleans, arrays wrapped, nested types."""
    if value is None:
        return None
    if value == "":
        return None
    ftype = field.type
    if ftype in ("integer", "number") and isinstance(value, str):
        return _to_number(value)
    if ftype == "boolean" and isinstance(value, str):
        if value == "true":
            return True
        if value == "false":
            return False
        return value
    if ftype in ("array", "set"):
        if not isinstance(value, list):
            value = [value]
        assert field.elements is not None
        return [infer_value(item, field.elements, entity) for item in value]
    if ftype == "foreign" and isinstance(value, dict):
        target = entity.resolver(field.reference) if entity and entity.resolver else None
        if target is not None and field.reference:
            return infer(value, target)
        return value
    if ftype == "map" and isinstance(value, dict) and field.values is not None:
        return {k: infer_value(v, field.values, entity) for k, v in value.items()}
    if ftype == "record" and isinstance(value, dict):
        out = {}
        for key, item in value.items():
            sub = field.field(key)
            out[key] = infer_value(item, sub, entity) if sub is not None else item
        return out
    return value


def _to_number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    if number != number or number in (float("inf"), float("-inf")):
        return text
    return int(number) if number.is_integer() else number


# -- the boundary ----------------------------------------------------------------------


def decode_body(
    method: bytes,
    content_types: Optional[Sequence[bytes]],
    body: bytes,
    entity: Optional[Entity],
    context: Optional[Mapping[str, Any]] = None,
) -> Any:
    """The request body as input for *entity*; ``{}`` when there is none.

    *context* (the row a PATCH applies to) helps pick the subschema that
    form values are coerced by (see :func:`infer`).

    Raises :class:`~kongtx.errors.BadRequest` (multiple Content-Type headers,
    unparsable JSON) or :class:`~kongtx.errors.UnsupportedMediaType`.
    """
    if method not in METHODS_WITH_BODY:
        return {}
    if content_types and len(content_types) > 1:
        raise errors.BadRequest(errors.MSG_MULTIPLE_CONTENT_TYPES)
    if not content_types:
        if body:
            raise errors.UnsupportedMediaType()
        return {}
    content_type = content_types[0].decode("latin-1")
    lowered = content_type.lower().strip()
    if lowered.startswith("application/json"):
        if not body.strip():
            return {}
        try:
            return json.loads(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise errors.BadRequest(errors.MSG_CANNOT_PARSE_JSON) from None
    if lowered.startswith("application/x-www-form-urlencoded"):
        args = nest_pairs(parse_form_pairs(body))
    elif lowered.startswith("multipart/form-data"):
        args = nest_pairs(parse_multipart(content_type, body))
    else:
        raise errors.UnsupportedMediaType()
    return infer(args, entity, context) if entity is not None else args
