"""``AdminResource``: the Admin API as one leaf ``twisted.web`` resource.

It routes on ``request.postpath`` (percent-decoded segments, trailing slash
tolerated), decodes bodies at the boundary (:mod:`kongtx.admin.body`), runs
the generic CRUD (:mod:`kongtx.admin.crud`) for every entity in
:data:`kongtx.schema.ENTITIES`, and always answers with Kong-shaped JSON.
"""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import quote, unquote_to_bytes

import attr
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from kongtx import errors
from kongtx.admin import legacy, node
from kongtx.admin.body import METHODS_WITH_BODY, decode_body
from kongtx.admin.crud import MAX_PAGE_SIZE, Crud, is_uuid
from kongtx.schema import ENTITIES
from kongtx.schema.entity import Entity
from kongtx.schema.plugins import with_plugins
from kongtx.store.interface import StoreError

__all__ = ["AdminResource", "AdminRequest", "Response", "make_site", "available_on_server"]

COLLECTION_METHODS = ("GET", "HEAD", "OPTIONS", "POST")
ENTITY_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "PUT")
READ_METHODS = ("GET", "HEAD", "OPTIONS")
VALIDATE_METHODS = ("OPTIONS", "POST")

MSG_SCHEMA_VALID = "schema validation successful"
MSG_NO_ENTITY = "No entity named '%s'"
MSG_NO_PLUGIN = "No plugin named '%s'"
MSG_BAD_CUSTOM_ID = "custom_id must be an unempty string"

_NO_PLUGINS: Mapping[str, type] = MappingProxyType({})

JSON_CONTENT_TYPE = b"application/json; charset=utf-8"

_log = Logger()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Response:
    """What a handler answers: status, JSON body (or ``None``) and extra headers."""

    status: int
    body: Any = None
    headers: Tuple[Tuple[str, str], ...] = ()


def _ok(body: Any) -> Response:
    return Response(200, body)


def _dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _error_response(error: errors.KongError) -> Response:
    return Response(error.status, error.body())


class AdminRequest(Request):
    """A request that leaves form bodies alone.

    twisted.web parses POSTed forms into ``request.args`` and answers a bare
    ``400`` with no body when a multipart body does not parse; the Admin API
    decodes bodies itself (and answers Kong-shaped errors), so it turns that off.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)


def make_site(resource: "AdminResource", **kwargs: Any) -> Site:
    """A ``Site`` serving *resource* with :class:`AdminRequest` requests."""
    site = Site(resource, **kwargs)
    site.requestFactory = AdminRequest
    return site


class _Route:
    """A parsed URL: which handler, with which entities and keys."""

    def __init__(self, kind: str, methods: Sequence[str], **params: Any) -> None:
        self.kind = kind
        self.methods = methods
        self.params = params


def available_on_server(plugins: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``GET /``'s ``available_on_server``: ``{name: {"version", "priority"}}``."""
    return {
        name: {"version": getattr(cls, "VERSION", None), "priority": getattr(cls, "PRIORITY", 0)}
        for name, cls in sorted(plugins.items())
    }


class AdminResource(Resource):
    """The Admin API; serve it with ``twisted.web.server.Site(AdminResource(...))``.

    *plugins* maps plugin names to the plugin classes the node loaded
    (``kongtx.plugins.load_plugins``): plugin rows are validated against them,
    and ``GET /`` lists them.  The older *plugins_available* (a ready
    ``available_on_server`` dict) is used only when *plugins* is empty.
    """

    isLeaf = True

    def __init__(
        self,
        store: Any,
        *,
        reactor: Any,
        node_id: str,
        hostname: str,
        configuration: Mapping[str, Any],
        max_body_size: int,
        server_stats: Callable[[], Dict[str, Any]],
        version: str,
        kong_version: str,
        plugins_available: Optional[Mapping[str, Any]] = None,
        entities: Optional[Mapping[str, Entity]] = None,
        ping_timeout: float = 2.0,
        plugins: Mapping[str, type] = _NO_PLUGINS,
    ) -> None:
        super().__init__()
        self._store = store
        self._reactor = reactor
        self._plugins = dict(plugins)
        known = dict(entities if entities is not None else ENTITIES)
        if "plugins" in known:
            known["plugins"] = with_plugins(known["plugins"], self._plugins)
        self._entities: Mapping[str, Entity] = known
        if self._plugins:
            plugins_available = available_on_server(self._plugins)
        self._crud = Crud(store, self._entities, reactor.seconds)
        self._legacy = legacy.LegacyApis(store, self._entities, self._crud, reactor.seconds)
        self._max_body_size = max_body_size
        self._server_header = ("kong/%s" % kong_version).encode("ascii")
        self._node = node.NodeInfo(
            node_id=node_id,
            hostname=hostname,
            configuration=dict(configuration),
            version=version,
            kong_version=kong_version,
            plugins_available=dict(plugins_available or {}),
            server_stats=server_stats,
        )
        self._ping_timeout = ping_timeout

    # -- twisted.web -------------------------------------------------------------

    def render(self, request: Request) -> Any:
        started = self._reactor.seconds()
        gone: List[bool] = []

        def client_gone(failure: Failure) -> None:
            gone.append(True)

        request.notifyFinish().addErrback(client_gone)

        async def run() -> Response:
            try:
                return await self._render_async(request)
            except errors.KongError as error:
                if error.status >= 500:
                    _log.failure("admin request failed: {error}", error=str(error))
                return _error_response(error)

        d = defer.ensureDeferred(run())

        def unexpected(failure: Failure) -> Response:
            _log.failure("unexpected error in admin API", failure)
            return _error_response(errors.Unexpected())

        d.addErrback(unexpected)
        d.addCallback(self._send, request, started, gone)
        d.addErrback(lambda f: _log.failure("could not send admin response", f))
        return NOT_DONE_YET

    def _send(
        self, response: Response, request: Request, started: float, gone: List[bool]
    ) -> None:
        if gone or request.finished:
            return
        latency = int(round((self._reactor.seconds() - started) * 1000))
        request.setResponseCode(response.status, errors.reason_phrase(response.status))
        request.setHeader(b"content-type", JSON_CONTENT_TYPE)
        request.setHeader(b"server", self._server_header)
        request.setHeader(b"x-kong-admin-latency", str(latency).encode("ascii"))
        request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"access-control-allow-credentials", b"true")
        for name, value in response.headers:
            request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        if response.status != 204 and response.body is not None:
            payload = _dumps(response.body)
            request.setHeader(b"content-length", str(len(payload)).encode("ascii"))
            request.write(payload)
        request.finish()

    # -- dispatch --------------------------------------------------------------------

    async def _render_async(self, request: Request) -> Response:
        segments = self._segments(request)
        route = self._route(segments) if segments is not None else None
        if route is None:
            raise errors.NotFound()
        method = request.method.decode("latin-1").upper()
        if method == "OPTIONS":
            allow = ", ".join(route.methods)
            return Response(
                204,
                None,
                (
                    ("Allow", allow),
                    ("Access-Control-Allow-Methods", allow),
                    ("Access-Control-Allow-Headers", self._allow_headers(request)),
                ),
            )
        if method not in route.methods:
            raise errors.MethodNotAllowed()
        if method == "HEAD":
            method = "GET"
        handler = getattr(self, "_handle_" + route.kind)
        result: Response = await handler(request, method, **route.params)
        return result

    def _allow_headers(self, request: Request) -> str:
        asked = request.getHeader(b"access-control-request-headers")
        return asked if asked else "Content-Type"

    def _segments(self, request: Request) -> Optional[List[str]]:
        raw = request.path.split(b"?", 1)[0]
        parts = raw.split(b"/")[1:]
        if parts and parts[-1] == b"":
            parts.pop()
        segments = []
        for part in parts:
            if part == b"":
                return None
            try:
                segments.append(unquote_to_bytes(part).decode("utf-8"))
            except UnicodeDecodeError:
                return None
        return segments

    def _by_path(self, name: str) -> Optional[Entity]:
        for entity in self._entities.values():
            if entity.path_name == name:
                return entity
        return None

    def _children(self, parent: Entity, name: str) -> Optional[Tuple[Entity, str]]:
        """The entity nested under *parent* as ``/parent/{p}/<name>`` and its foreign field."""
        for entity in self._entities.values():
            if entity.nested_path_name != name:
                continue
            for field_name, field in entity.foreign_fields():
                if field.reference == parent.name:
                    return entity, field_name
        return None

    def _route(self, segments: List[str]) -> Optional[_Route]:
        count = len(segments)
        if count == 0:
            return _Route("root", READ_METHODS)
        if segments == ["status"]:
            return _Route("status", READ_METHODS)
        if segments[0] == "schemas" and count in (2, 3):
            if count == 2:
                return _Route("schema", READ_METHODS, name=segments[1])
            if segments[2] == "validate":
                return _Route("schema_validate", VALIDATE_METHODS, name=segments[1])
            if segments[1] == "plugins" and "plugins" in self._entities:
                return _Route("plugin_schema", READ_METHODS, name=segments[2])
            return None
        if segments == ["plugins", "enabled"] and "plugins" in self._entities:
            return _Route("plugins_enabled", READ_METHODS)
        if segments[0] == legacy.ENTITY and legacy.ENTITY in self._entities:
            found = legacy.route(segments)
            if found is None:
                return None
            kind, methods, params = found
            return _Route("legacy", methods, legacy_kind=kind, **params)
        entity = self._by_path(segments[0])
        if entity is None:
            return None
        if count == 1:
            return _Route("collection", COLLECTION_METHODS, entity=entity)
        key = segments[1]
        if count == 2:
            return _Route("entity", ENTITY_METHODS, entity=entity, key=key)
        field = entity.field(segments[2])
        if count == 3 and field is not None and field.type == "foreign":
            target = self._entities.get(field.reference or "")
            if target is None:
                return None
            return _Route(
                "foreign_entity",
                ENTITY_METHODS,
                entity=entity,
                key=key,
                field_name=segments[2],
                target=target,
            )
        nested = self._children(entity, segments[2])
        if nested is None:
            return None
        child, field_name = nested
        if count == 3:
            return _Route(
                "nested_collection",
                COLLECTION_METHODS,
                parent=entity,
                key=key,
                entity=child,
                field_name=field_name,
            )
        if count == 4:
            return _Route(
                "nested_entity",
                ENTITY_METHODS,
                parent=entity,
                key=key,
                entity=child,
                field_name=field_name,
                child_key=segments[3],
            )
        return None

    # -- body and query ------------------------------------------------------------------

    def _body(
        self,
        request: Request,
        entity: Optional[Entity],
        context: Optional[Mapping[str, Any]] = None,
    ) -> Any:
        method = request.method.upper()
        if method not in METHODS_WITH_BODY:
            return {}
        declared = request.getHeader(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self._max_body_size:
                    raise errors.PayloadTooLarge()
            except ValueError:
                raise errors.BadRequest("Invalid Content-Length") from None
        content = request.content
        body = b""
        if content is not None:
            content.seek(0, 2)
            if content.tell() > self._max_body_size:
                raise errors.PayloadTooLarge()
            content.seek(0)
            body = content.read()
        content_types = request.requestHeaders.getRawHeaders(b"content-type")
        return decode_body(method, content_types, body, entity, context)

    def _arg(self, request: Request, name: str) -> Optional[str]:
        values = (request.args or {}).get(name.encode("ascii"))
        if not values:
            return None
        return values[0].decode("utf-8", errors="replace")

    def _page_args(self, request: Request) -> Tuple[Optional[int], Optional[str], str]:
        raw_size = self._arg(request, "size")
        size: Optional[int] = None
        size_suffix = ""
        if raw_size is not None:
            try:
                number = float(raw_size)
            except ValueError:
                raise errors.InvalidSize.not_a_number() from None
            if number != number or not number.is_integer() or not 1 <= number <= MAX_PAGE_SIZE:
                raise errors.InvalidSize.out_of_range(MAX_PAGE_SIZE)
            size = int(number)
            size_suffix = "&size=" + raw_size
        offset = self._arg(request, "offset")
        return size, offset, size_suffix

    # -- handlers ------------------------------------------------------------------------

    async def _handle_legacy(
        self, request: Request, method: str, legacy_kind: str, **params: str
    ) -> Response:
        """The 0.x ``/apis`` URLs (:mod:`kongtx.admin.legacy`)."""
        status, body = await self._legacy.handle(legacy_kind, request, method, self._body, **params)
        return Response(status, body)

    async def _handle_root(self, request: Request, method: str) -> Response:
        body = self._node.root()
        body["plugins"]["enabled_in_cluster"] = await self._enabled_in_cluster()
        return _ok(body)

    async def _enabled_in_cluster(self) -> List[str]:
        """The distinct names of the stored plugin rows (``[]`` if the store fails)."""
        if "plugins" not in self._entities:
            return []
        try:
            rows = await self._store.all("plugins")
        except StoreError as exc:
            _log.warn("cannot list plugins for GET /: {error}", error=str(exc))
            return []
        return sorted({row["name"] for row in rows if isinstance(row.get("name"), str)})

    async def _handle_plugins_enabled(self, request: Request, method: str) -> Response:
        return _ok({"enabled_plugins": sorted(self._plugins)})

    async def _handle_plugin_schema(self, request: Request, method: str, name: str) -> Response:
        subschema = self._entities["plugins"].subschemas.get(name)
        if subschema is None:
            raise errors.NotFound(MSG_NO_PLUGIN % name)
        return _ok(node.plugin_schema_to_json(subschema))

    async def _handle_status(self, request: Request, method: str) -> Response:
        unit = self._arg(request, "unit")
        scale = self._arg(request, "scale")
        memory = node.memory_info(unit, scale, node.workers(self._node.server_stats))
        reachable = await node.ping(self._store, self._reactor, self._ping_timeout)
        return _ok(
            {
                "database": {"reachable": reachable},
                "memory": memory,
                "server": self._node.server_stats(),
            }
        )

    async def _handle_schema(self, request: Request, method: str, name: str) -> Response:
        entity = self._entities.get(name)
        if entity is None:
            raise errors.NotFound(MSG_NO_ENTITY % name)
        return _ok(node.schema_to_json(entity))

    async def _handle_schema_validate(
        self, request: Request, method: str, name: str
    ) -> Response:
        entity = self._entities.get(name)
        if entity is None:
            raise errors.NotFound(MSG_NO_ENTITY % name)
        data = self._body(request, entity)
        if isinstance(data, dict):
            for field_name, field in entity.foreign_fields():
                value = data.get(field_name)
                if isinstance(value, dict) and not is_uuid(value.get("id")):
                    data[field_name] = {"id": "00000000-0000-0000-0000-000000000000"}
        entity.validate_insert(
            data, now=int(self._reactor.seconds()), new_id="00000000-0000-0000-0000-000000000000"
        )
        return _ok({"message": MSG_SCHEMA_VALID})

    async def _handle_collection(
        self, request: Request, method: str, entity: Entity
    ) -> Response:
        if method == "GET":
            if entity.name == "consumers" and b"custom_id" in (request.args or {}):
                return await self._consumer_by_custom_id(request, entity)
            size, offset, size_suffix = self._page_args(request)
            rows, next_offset = await self._crud.page(entity, size, offset)
            return _ok(
                self._page_body(rows, next_offset, "/%s" % entity.path_name, size_suffix)
            )
        data = self._body(request, entity)
        row = await self._crud.insert(entity, data)
        return Response(201, row)

    async def _consumer_by_custom_id(self, request: Request, entity: Entity) -> Response:
        """``GET /consumers?custom_id=x``: a one-page list holding that consumer, or none."""
        custom_id = self._arg(request, "custom_id")
        if not custom_id:
            raise errors.BadRequest(MSG_BAD_CUSTOM_ID)
        found = await self._crud.select_by(entity, "custom_id", custom_id)
        return _ok({"data": [found] if found is not None else [], "next": None})

    async def _handle_entity(
        self, request: Request, method: str, entity: Entity, key: str
    ) -> Response:
        if method == "PUT":
            data = self._body(request, entity)
            return _ok(await self._crud.upsert(entity, key, data))
        row = await self._crud.select(entity, key)
        if method == "DELETE":
            if row is not None:
                await self._crud.delete(entity, row)
            return Response(204)
        if row is None:
            raise errors.NotFound()
        if method == "GET":
            return _ok(row)
        data = self._body(request, entity, row)
        return _ok(await self._crud.update(entity, row, data))

    async def _handle_foreign_entity(
        self,
        request: Request,
        method: str,
        entity: Entity,
        key: str,
        field_name: str,
        target: Entity,
    ) -> Response:
        row = await self._crud.select(entity, key)
        if row is None:
            raise errors.NotFound()
        reference = row.get(field_name)
        target_id = reference.get("id") if isinstance(reference, dict) else None
        if method == "PUT":
            data = self._body(request, target)
            if target_id is None:
                created = await self._crud.upsert(target, self._crud_new_id(), data)
                fresh = await self._crud.select(entity, row["id"])
                if fresh is not None:
                    await self._crud.update(entity, fresh, {field_name: {"id": created["id"]}})
                return _ok(created)
            return _ok(await self._crud.upsert(target, target_id, data))
        if target_id is None:
            raise errors.NotFound()
        if method == "DELETE":
            raise errors.MethodNotAllowed()
        target_row = await self._crud.select(target, target_id)
        if target_row is None:
            raise errors.NotFound()
        if method == "GET":
            return _ok(target_row)
        data = self._body(request, target)
        return _ok(await self._crud.update(target, target_row, data))

    def _crud_new_id(self) -> str:
        import uuid

        return str(uuid.uuid4())

    async def _handle_nested_collection(
        self,
        request: Request,
        method: str,
        parent: Entity,
        key: str,
        entity: Entity,
        field_name: str,
    ) -> Response:
        parent_row = await self._crud.select(parent, key)
        if parent_row is None:
            raise errors.NotFound()
        if method == "GET":
            size, offset, _ = self._page_args(request)
            rows, next_offset = await self._crud.page(
                entity, size, offset, {field_name: parent_row["id"]}
            )
            base = "/%s/%s/%s" % (parent.path_name, quote(key, safe=""), entity.nested_path_name)
            return _ok(self._page_body(rows, next_offset, base, ""))
        data = self._body(request, entity)
        if isinstance(data, dict):
            data[field_name] = {"id": parent_row["id"]}
        return Response(201, await self._crud.insert(entity, data))

    async def _handle_nested_entity(
        self,
        request: Request,
        method: str,
        parent: Entity,
        key: str,
        entity: Entity,
        field_name: str,
        child_key: str,
    ) -> Response:
        parent_row = await self._crud.select(parent, key)
        if parent_row is None:
            raise errors.NotFound()
        parent_ref = {"id": parent_row["id"]}
        row = await self._crud.select(entity, child_key)
        if method == "PUT":
            if row is not None and row.get(field_name) != parent_ref:
                raise errors.NotFound()
            data = self._body(request, entity)
            if isinstance(data, dict):
                data[field_name] = parent_ref
            return _ok(await self._crud.upsert(entity, child_key, data))
        if row is None or row.get(field_name) != parent_ref:
            raise errors.NotFound()
        if method == "GET":
            return _ok(row)
        if method == "DELETE":
            await self._crud.delete(entity, row)
            return Response(204)
        data = self._body(request, entity, row)
        if isinstance(data, dict) and field_name not in data:
            data[field_name] = parent_ref
        return _ok(await self._crud.update(entity, row, data))

    def _page_body(
        self, rows: List[Dict[str, Any]], next_offset: Optional[str], base: str, size_suffix: str
    ) -> Dict[str, Any]:
        body: Dict[str, Any] = {"data": list(rows)}
        if next_offset is not None:
            body["offset"] = next_offset
            body["next"] = "%s?offset=%s%s" % (base, quote(next_offset, safe=""), size_suffix)
        else:
            body["next"] = None
        return body
