"""The legacy Kong 0.x ``/apis`` endpoints, with 0.x's list and error shapes.

``/apis`` (GET, POST, PUT), ``/apis/{id or name}`` (GET, PATCH, PUT, DELETE),
``/apis/{api}/plugins`` (GET, POST) and ``/apis/{api}/plugins/{id}`` (GET,
PATCH, DELETE).  Lists are ``{"data": [...], "total": N}`` (plus ``offset`` and
an absolute ``next`` URL when there is another page); errors are 0.x's flat
``{field: message}`` objects and ``409 {"name": "already exists with value 'x'"}``.
:func:`route` tells the Admin API dispatcher which URLs are ours;
:class:`LegacyApis` answers them.  See ``docs/legacy-apis.md``.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple
from urllib.parse import quote

from kongtx import errors
from kongtx.admin.crud import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, Crud, is_uuid
from kongtx.schema.apis import ERR_ALREADY_EXISTS, ApiViolation, validate_api
from kongtx.schema.entity import Entity
from kongtx.store import interface as store_api

__all__ = ["LegacyError", "LegacyApis", "route", "flatten_errors"]

COLLECTION_METHODS = ("GET", "HEAD", "OPTIONS", "POST", "PUT")
NESTED_COLLECTION_METHODS = ("GET", "HEAD", "OPTIONS", "POST")
ENTITY_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "PUT")
NESTED_ENTITY_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH")

MSG_BAD_SIZE = "size must be a number between 1 and %d" % MAX_PAGE_SIZE
MSG_BAD_OFFSET = "offset is not valid"

ENTITY = "apis"

#: ``(status, body)``: what a handler answers.
Answer = Tuple[int, Any]
#: ``body(request, entity or None, context row or None)``: the decoded request body.
BodyReader = Callable[[Any, Optional[Entity], Optional[Mapping[str, Any]]], Any]


class LegacyError(errors.KongError):
    """An error answered with 0.x's body as it is (``{"name": "name is required"}``)."""

    def __init__(self, status: int, body: Dict[str, Any]) -> None:
        super().__init__(body)
        self.status = status
        self._body = body

    def body(self) -> Dict[str, Any]:
        return dict(self._body)


def route(segments: Sequence[str]) -> Optional[Tuple[str, Sequence[str], Dict[str, str]]]:
    """``(handler kind, allowed methods, params)`` for an ``/apis`` URL, else ``None``."""
    count = len(segments)
    if not segments or segments[0] != ENTITY or count > 4:
        return None
    if count == 1:
        return "apis", COLLECTION_METHODS, {}
    if count == 2:
        return "api", ENTITY_METHODS, {"key": segments[1]}
    if segments[2] != "plugins":
        return None
    if count == 3:
        return "api_plugins", NESTED_COLLECTION_METHODS, {"key": segments[1]}
    return "api_plugin", NESTED_ENTITY_METHODS, {"key": segments[1], "plugin_key": segments[3]}


def flatten_errors(fields: Any, prefix: str = "") -> Dict[str, str]:
    """3.x schema-violation ``fields`` as 0.x's flat ``{"config.minute": message}``."""
    flat: Dict[str, str] = {}
    if isinstance(fields, dict):
        for key, value in fields.items():
            if key == errors.ENTITY_ERRORS_KEY:
                flat["message"] = "; ".join(str(v) for v in value or ())
                continue
            flat.update(flatten_errors(value, "%s%s." % (prefix, key)))
    elif isinstance(fields, list):
        for value in fields:
            if value is not None:
                flat.update(flatten_errors(value, prefix))
    elif fields is not None:
        flat[prefix[:-1]] = str(fields)
    return flat


def _conflict(fields: Mapping[str, Any]) -> LegacyError:
    name, value = next(iter(fields.items())) if fields else ("id", None)
    if "name" in fields:
        name, value = "name", fields["name"]
    if isinstance(value, dict):
        value = value.get("id")
    return LegacyError(409, {name: ERR_ALREADY_EXISTS % (value,)})


class LegacyApis:
    """Answers the ``/apis`` URLs against *store*; *now* gives seconds (the reactor's clock).

    *entities* are the Admin API's entities (``plugins`` already specialised by
    the loaded plugin classes); *crud* is the Admin API's :class:`Crud`.
    """

    def __init__(
        self,
        store: Any,
        entities: Mapping[str, Entity],
        crud: Crud,
        now: Callable[[], float],
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self._store = store
        self._entities = entities
        self._crud = crud
        self._now = now
        self._new_id = new_id

    async def handle(
        self, kind: str, request: Any, method: str, body: BodyReader, **params: str
    ) -> Answer:
        """Run handler *kind* (from :func:`route`); raises :class:`LegacyError` or ``KongError``."""
        try:
            handler = getattr(self, "_" + kind)
            answer: Answer = await handler(request, method, body, **params)
            return answer
        except ApiViolation as exc:
            raise LegacyError(400, exc.errors) from None
        except store_api.UniqueViolation as exc:
            raise _conflict(exc.fields) from None
        except errors.UniqueViolation as exc:
            raise _conflict(exc.fields or {}) from None
        except (errors.SchemaViolation, errors.ForeignKeysUnresolved) as exc:
            raise LegacyError(400, flatten_errors(exc.fields)) from None
        except store_api.InvalidOffset:
            raise LegacyError(400, {"message": MSG_BAD_OFFSET}) from None
        except errors.InvalidOffset:
            raise LegacyError(400, {"message": MSG_BAD_OFFSET}) from None
        except store_api.StoreUnavailable as exc:
            raise errors.DatabaseError(str(exc.reason)) from None

    # -- /apis ---------------------------------------------------------------------

    async def _apis(self, request: Any, method: str, body: BodyReader) -> Answer:
        if method == "GET":
            return 200, await self._list(request, ENTITY, None, "/apis")
        data = body(request, None, None)
        if method == "PUT" and isinstance(data, dict) and data.get("id") is not None:
            existing = await self._get_api(str(data["id"]))
            if existing is not None:
                return 200, await self._replace(existing, data)
        return 201, await self._store.insert(ENTITY, self._validate(data))

    async def _api(self, request: Any, method: str, body: BodyReader, key: str) -> Answer:
        row = await self._get_api(key)
        if method == "PUT":
            data = body(request, None, None)
            if isinstance(data, dict) and not is_uuid(key):
                data["name"] = key
            if row is not None:
                return 200, await self._replace(row, data)
            if isinstance(data, dict) and is_uuid(key):
                data["id"] = key.lower()
            return 200, await self._store.insert(ENTITY, self._validate(data))
        if row is None:
            raise errors.NotFound()
        if method == "GET":
            return 200, row
        if method == "DELETE":
            await self._store.delete(ENTITY, row["id"])
            return 204, None
        data = body(request, None, row)
        updated = validate_api(data, now_ms=self._now_ms(), new_id=row["id"], existing=row)
        return 200, await self._store.update(ENTITY, updated)

    # -- /apis/{api}/plugins ----------------------------------------------------------------

    async def _api_plugins(
        self, request: Any, method: str, body: BodyReader, key: str
    ) -> Answer:
        api = await self._require_api(key)
        if method == "GET":
            base = "/apis/%s/plugins" % quote(key, safe="")
            return 200, await self._list(request, "plugins", {"api": api["id"]}, base)
        plugins = self._entities["plugins"]
        data = body(request, plugins, None)
        if isinstance(data, dict):
            data["api"] = {"id": api["id"]}
        return 201, await self._crud.insert(plugins, data)

    async def _api_plugin(
        self, request: Any, method: str, body: BodyReader, key: str, plugin_key: str
    ) -> Answer:
        api = await self._require_api(key)
        plugins = self._entities["plugins"]
        row = await self._crud.select(plugins, plugin_key)
        if row is None or row.get("api") != {"id": api["id"]}:
            raise errors.NotFound()
        if method == "GET":
            return 200, row
        if method == "DELETE":
            await self._crud.delete(plugins, row)
            return 204, None
        data = body(request, plugins, row)
        if isinstance(data, dict):
            data["api"] = {"id": api["id"]}
        return 200, await self._crud.update(plugins, row, data)

    # -- helpers ----------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._now() * 1000)

    def _validate(self, data: Any) -> Dict[str, Any]:
        return validate_api(data, now_ms=self._now_ms(), new_id=self._new_id())

    async def _replace(self, existing: Mapping[str, Any], data: Any) -> Dict[str, Any]:
        """PUT over an existing API: the whole entity, omitted fields back to defaults."""
        if isinstance(data, dict):
            data = dict(data)
            data.pop("id", None)
            data.pop("created_at", None)
        row = validate_api(data, now_ms=self._now_ms(), new_id=existing["id"])
        row["id"] = existing["id"]
        row["created_at"] = existing.get("created_at", row["created_at"])
        result: Dict[str, Any] = await self._store.update(ENTITY, row)
        return result

    async def _get_api(self, key: str) -> Optional[Dict[str, Any]]:
        if is_uuid(key):
            found: Optional[Dict[str, Any]] = await self._store.get(ENTITY, key.lower())
            return found
        found = await self._store.get_by(ENTITY, "name", key)
        return found

    async def _require_api(self, key: str) -> Dict[str, Any]:
        api = await self._get_api(key)
        if api is None:
            raise errors.NotFound()
        return api

    async def _list(
        self, request: Any, entity: str, where: Optional[Dict[str, Any]], base: str
    ) -> Dict[str, Any]:
        """0.x's list: ``data``, ``total``, and ``offset`` + absolute ``next`` if paginated."""
        size = _size(request)
        offset = _arg(request, "offset")
        rows, next_offset = await self._store.page(entity, size, offset, where)
        total = len(await self._store.all(entity, where))
        body: Dict[str, Any] = {"data": list(rows), "total": total}
        if next_offset is not None:
            body["offset"] = next_offset
            body["next"] = "%s%s?offset=%s&size=%d" % (
                _origin(request), base, quote(next_offset, safe=""), size)
        return body


def _arg(request: Any, name: str) -> Optional[str]:
    values = (request.args or {}).get(name.encode("ascii"))
    return values[0].decode("utf-8", errors="replace") if values else None


def _size(request: Any) -> int:
    raw = _arg(request, "size")
    if raw is None:
        return DEFAULT_PAGE_SIZE
    try:
        size = int(raw)
    except ValueError:
        raise LegacyError(400, {"size": MSG_BAD_SIZE}) from None
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise LegacyError(400, {"size": MSG_BAD_SIZE})
    return size


def _origin(request: Any) -> str:
    """``http://host:port`` of the Admin API as the client addressed it."""
    scheme = "https" if request.isSecure() else "http"
    raw = request.getHeader(b"host")
    host = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    if not host:
        address = request.getHost()
        host = "%s:%d" % (getattr(address, "host", "localhost"), getattr(address, "port", 8001))
    return "%s://%s" % (scheme, host)

