"""The ``IStore`` contract: one suite every backend must pass.

A backend's test module subclasses :class:`StoreContract` (the subclass name
must start with ``Test`` so pytest collects it) and implements
``make_store(entities, directory)`` returning an unstarted store. The ``store``
fixture starts it with :data:`ENTITIES` and stops it after the test; a backend
that needs more (a fresh Postgres schema per test) overrides the fixture.

The entities below are test-only metadata shaped like Kong's: ``routes``
restrict the deletion of their service, credentials and plugins cascade,
``services.client_certificate`` is nulled, and ``teams`` cascade into both
consumers and services so that a cascade can run into a restrict half-way.
"""

from __future__ import annotations

import uuid
from typing import Any, Dict, Iterator, List, Mapping, Optional

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

from kongtx.store.interface import (
    ChangeEvent,
    EntityMeta,
    ForeignKey,
    ForeignKeyViolation,
    InvalidOffset,
    IStore,
    NotFoundError,
    ReferencedByOthers,
    UniqueViolation,
    UnsupportedFilter,
    encode_offset,
)

ENTITIES: Mapping[str, EntityMeta] = {
    "teams": EntityMeta("teams", unique=("name",)),
    "certificates": EntityMeta("certificates"),
    "consumers": EntityMeta(
        "consumers",
        unique=("username", "custom_id"),
        foreign={"team": ForeignKey("teams", on_delete="cascade")},
        order_by="created_at",
    ),
    "services": EntityMeta(
        "services",
        unique=("name",),
        foreign={
            "team": ForeignKey("teams", on_delete="cascade"),
            "client_certificate": ForeignKey("certificates", on_delete="null"),
        },
    ),
    "routes": EntityMeta(
        "routes", unique=("name",), foreign={"service": ForeignKey("services")}
    ),
    "keyauth_credentials": EntityMeta(
        "keyauth_credentials",
        unique=("key",),
        foreign={"consumer": ForeignKey("consumers", on_delete="cascade")},
    ),
    "plugins": EntityMeta(
        "plugins",
        unique=("instance_name",),
        foreign={
            "route": ForeignKey("routes", on_delete="cascade"),
            "service": ForeignKey("services", on_delete="cascade"),
            "consumer": ForeignKey("consumers", on_delete="cascade"),
        },
        cache_key=("name", "route", "service", "consumer"),
    ),
    "team_settings": EntityMeta(
        "team_settings",
        unique=("team",),
        foreign={"team": ForeignKey("teams", on_delete="cascade")},
    ),
}


def new_id() -> str:
    return str(uuid.uuid4())


def ref(row: Optional[Mapping[str, Any]]) -> Optional[Dict[str, str]]:
    """The foreign-key value pointing at ``row``."""
    return {"id": row["id"]} if row is not None else None


def team(name: Optional[str] = None) -> Dict[str, Any]:
    return {"id": new_id(), "name": name, "tags": None}


def certificate() -> Dict[str, Any]:
    return {"id": new_id(), "cert": "-----BEGIN CERTIFICATE-----", "key": "k"}


def service(name: Optional[str] = None, **fields: Any) -> Dict[str, Any]:
    row = {
        "id": new_id(),
        "name": name,
        "host": "example.com",
        "port": 80,
        "path": None,
        "retries": 5,
        "team": None,
        "client_certificate": None,
        "tags": None,
    }
    row.update(fields)
    return row


def route(svc: Optional[Mapping[str, Any]], name: Optional[str] = None, **fields: Any) -> Dict[str, Any]:
    row = {"id": new_id(), "name": name, "paths": ["/"], "service": ref(svc), "tags": None}
    row.update(fields)
    return row


def consumer(username: Optional[str] = None, created_at: Optional[int] = 1, **fields: Any) -> Dict[str, Any]:
    row = {
        "id": new_id(),
        "username": username,
        "custom_id": None,
        "created_at": created_at,
        "team": None,
        "tags": None,
    }
    row.update(fields)
    return row


def credential(owner: Mapping[str, Any], key: str) -> Dict[str, Any]:
    return {"id": new_id(), "key": key, "consumer": ref(owner), "ttl": None}


def plugin(
    name: str,
    route_row: Optional[Mapping[str, Any]] = None,
    service_row: Optional[Mapping[str, Any]] = None,
    consumer_row: Optional[Mapping[str, Any]] = None,
    **fields: Any,
) -> Dict[str, Any]:
    row = {
        "id": new_id(),
        "name": name,
        "instance_name": None,
        "route": ref(route_row),
        "service": ref(service_row),
        "consumer": ref(consumer_row),
        "config": {"minute": 5, "hide_credentials": False, "key_names": ["apikey"], "ratio": 0.25},
        "enabled": True,
    }
    row.update(fields)
    return row


async def failure_of(d: "defer.Deferred[Any]") -> BaseException:
    """The exception ``d`` fails with; the test fails if ``d`` succeeds."""
    try:
        result = await d
    except Exception as e:
        return e
    raise AssertionError(f"expected a failure, got {result!r}")


class StoreContract:
    """The behaviour every ``IStore`` backend must have."""

    def make_store(self, entities: Mapping[str, EntityMeta], directory: str) -> Any:
        """An unstarted store for ``entities``; ``directory`` is a fresh temporary directory."""
        raise NotImplementedError

    @pytest.fixture
    def store(self, tmp_path: Any) -> Iterator[Any]:
        store = self.make_store(ENTITIES, str(tmp_path))
        pytest_twisted.blockon(store.start())
        yield store
        pytest_twisted.blockon(store.stop())

    # -- basics ---------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_provides_istore_and_answers_ping(self, store: Any) -> None:
        """The store provides IStore and a started store pings True."""
        assert verifyObject(IStore, store)
        assert await store.ping() is True

    @pytest_twisted.ensureDeferred
    async def test_insert_returns_row_and_get_finds_it(self, store: Any) -> None:
        """insert fires with the stored row; get returns an equal row, or None for an unknown id."""
        row = service("svc", path="/π", tags=["a", "b"])
        assert await store.insert("services", row) == row
        assert await store.get("services", row["id"]) == row
        assert await store.get("services", new_id()) is None

    @pytest_twisted.ensureDeferred
    async def test_nested_documents_round_trip(self, store: Any) -> None:
        """Nested config (lists, floats, booleans, nulls, unicode) comes back unchanged."""
        row = plugin("rate-limiting", config={"a": [1, 2.5, None, True], "b": {"ü": "✓"}, "c": -0.1})
        await store.insert("plugins", row)
        assert await store.get("plugins", row["id"]) == row

    @pytest_twisted.ensureDeferred
    async def test_get_by_unique_field_and_id(self, store: Any) -> None:
        """get_by finds a row by a unique field or by id, and None for an unknown or null value."""
        row = consumer("bob", custom_id="c-1")
        await store.insert("consumers", row)
        assert await store.get_by("consumers", "username", "bob") == row
        assert await store.get_by("consumers", "custom_id", "c-1") == row
        assert await store.get_by("consumers", "id", row["id"]) == row
        assert await store.get_by("consumers", "username", "alice") is None
        assert await store.get_by("consumers", "username", "BOB") is None
        assert await store.get_by("consumers", "username", None) is None

    @pytest_twisted.ensureDeferred
    async def test_get_by_non_unique_field_fails(self, store: Any) -> None:
        """get_by on a field that is not unique fails with UnsupportedFilter."""
        error = await failure_of(store.get_by("services", "host", "example.com"))
        assert isinstance(error, UnsupportedFilter)
        assert (error.entity, error.field) == ("services", "host")

    # -- uniqueness -------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_duplicate_id_is_a_unique_violation(self, store: Any) -> None:
        """A second insert with the same id fails with UniqueViolation on id and keeps the first row."""
        row = service("one")
        await store.insert("services", row)
        error = await failure_of(store.insert("services", dict(row, name="two")))
        assert isinstance(error, UniqueViolation)
        assert (error.entity, error.fields) == ("services", {"id": row["id"]})
        assert await store.get("services", row["id"]) == row

    @pytest_twisted.ensureDeferred
    async def test_duplicate_unique_field_names_the_field(self, store: Any) -> None:
        """A duplicate unique value fails with fields {field: value} and stores nothing."""
        await store.insert("consumers", consumer("bob"))
        dup = consumer("bob")
        error = await failure_of(store.insert("consumers", dup))
        assert isinstance(error, UniqueViolation)
        assert (error.entity, error.fields) == ("consumers", {"username": "bob"})
        assert await store.get("consumers", dup["id"]) is None

    @pytest_twisted.ensureDeferred
    async def test_second_unique_field_is_enforced_too(self, store: Any) -> None:
        """Each unique field is enforced on its own."""
        await store.insert("consumers", consumer("bob", custom_id="x"))
        error = await failure_of(store.insert("consumers", consumer("alice", custom_id="x")))
        assert isinstance(error, UniqueViolation)
        assert error.fields == {"custom_id": "x"}

    @pytest_twisted.ensureDeferred
    async def test_null_unique_values_never_conflict(self, store: Any) -> None:
        """Several rows may leave a unique field null."""
        await store.insert("services", service(None))
        await store.insert("services", service(None))
        assert len(await store.all("services")) == 2

    @pytest_twisted.ensureDeferred
    async def test_cache_key_violation_counts_nulls(self, store: Any) -> None:
        """Two plugins with the same name and scope (nulls included) violate the cache key.

        The error names every cache-key field with its value, foreign keys as {"id": ...}.
        """
        svc = await store.insert("services", service("s"))
        await store.insert("plugins", plugin("basic-auth", service_row=svc))
        error = await failure_of(store.insert("plugins", plugin("basic-auth", service_row=svc)))
        assert isinstance(error, UniqueViolation)
        assert error.entity == "plugins"
        assert error.fields == {
            "name": "basic-auth",
            "route": None,
            "service": {"id": svc["id"]},
            "consumer": None,
        }

    @pytest_twisted.ensureDeferred
    async def test_cache_key_distinguishes_null_from_set(self, store: Any) -> None:
        """A global plugin and a service-scoped plugin of the same name coexist."""
        svc = await store.insert("services", service("s"))
        await store.insert("plugins", plugin("cors"))
        await store.insert("plugins", plugin("cors", service_row=svc))
        await store.insert("plugins", plugin("key-auth"))
        error = await failure_of(store.insert("plugins", plugin("cors")))
        assert isinstance(error, UniqueViolation)
        assert error.fields == {"name": "cors", "route": None, "service": None, "consumer": None}
        assert len(await store.all("plugins")) == 3

    @pytest_twisted.ensureDeferred
    async def test_unique_foreign_key(self, store: Any) -> None:
        """A unique foreign key allows one row per target and is found by id or {"id": id}."""
        t = await store.insert("teams", team("t"))
        settings = await store.insert("team_settings", {"id": new_id(), "team": ref(t), "x": 1})
        error = await failure_of(store.insert("team_settings", {"id": new_id(), "team": ref(t)}))
        assert isinstance(error, UniqueViolation)
        assert error.fields == {"team": {"id": t["id"]}}
        assert await store.get_by("team_settings", "team", t["id"]) == settings
        assert await store.get_by("team_settings", "team", ref(t)) == settings
        assert await store.all("team_settings", where={"team": t["id"]}) == [settings]
        await store.delete("teams", t["id"])
        assert await store.get_by("team_settings", "team", t["id"]) is None

    # -- foreign keys -------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_missing_foreign_row_is_refused(self, store: Any) -> None:
        """Inserting a row whose foreign key names a missing row fails and stores nothing."""
        missing = {"id": new_id()}
        row = route(None, "r", service=missing)
        error = await failure_of(store.insert("routes", row))
        assert isinstance(error, ForeignKeyViolation)
        assert (error.entity, error.field, error.target, error.value) == (
            "routes",
            "service",
            "services",
            missing,
        )
        assert await store.get("routes", row["id"]) is None

    @pytest_twisted.ensureDeferred
    async def test_null_foreign_key_is_allowed(self, store: Any) -> None:
        """A null foreign key needs no referenced row."""
        row = await store.insert("routes", route(None, "r"))
        assert row["service"] is None

    # -- update -------------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_update_replaces_the_whole_row(self, store: Any) -> None:
        """update stores exactly the given row: fields it omits are gone."""
        row = await store.insert("services", service("s", path="/a"))
        replacement = {"id": row["id"], "name": "s2", "host": "other.test"}
        assert await store.update("services", replacement) == replacement
        assert await store.get("services", row["id"]) == replacement
        assert await store.get_by("services", "name", "s2") == replacement
        assert await store.get_by("services", "name", "s") is None

    @pytest_twisted.ensureDeferred
    async def test_update_keeping_own_unique_value_is_fine(self, store: Any) -> None:
        """A row does not conflict with itself on update (unique field and cache key)."""
        svc = await store.insert("services", service("s"))
        assert (await store.update("services", dict(svc, port=8080)))["port"] == 8080
        p = await store.insert("plugins", plugin("cors", service_row=svc))
        assert (await store.update("plugins", dict(p, enabled=False)))["enabled"] is False

    @pytest_twisted.ensureDeferred
    async def test_update_onto_a_taken_unique_value_fails(self, store: Any) -> None:
        """update to another row's unique value fails with UniqueViolation and changes nothing."""
        await store.insert("services", service("a"))
        b = await store.insert("services", service("b"))
        error = await failure_of(store.update("services", dict(b, name="a", port=1)))
        assert isinstance(error, UniqueViolation)
        assert error.fields == {"name": "a"}
        assert await store.get("services", b["id"]) == b

    @pytest_twisted.ensureDeferred
    async def test_update_onto_a_taken_cache_key_fails(self, store: Any) -> None:
        """update that makes two plugins share a cache key fails."""
        svc = await store.insert("services", service("s"))
        await store.insert("plugins", plugin("cors"))
        scoped = await store.insert("plugins", plugin("cors", service_row=svc))
        error = await failure_of(store.update("plugins", dict(scoped, service=None)))
        assert isinstance(error, UniqueViolation)
        assert error.fields == {"name": "cors", "route": None, "service": None, "consumer": None}
        assert await store.get("plugins", scoped["id"]) == scoped

    @pytest_twisted.ensureDeferred
    async def test_update_of_missing_row_is_not_found(self, store: Any) -> None:
        """update of an id that is not stored fails with NotFoundError and creates nothing."""
        row = service("ghost")
        error = await failure_of(store.update("services", row))
        assert isinstance(error, NotFoundError)
        assert (error.entity, error.id) == ("services", row["id"])
        assert await store.get("services", row["id"]) is None

    @pytest_twisted.ensureDeferred
    async def test_update_to_missing_foreign_row_fails(self, store: Any) -> None:
        """update that points a foreign key at a missing row fails and keeps the old row."""
        svc = await store.insert("services", service("s"))
        r = await store.insert("routes", route(svc, "r"))
        error = await failure_of(store.update("routes", dict(r, service={"id": new_id()})))
        assert isinstance(error, ForeignKeyViolation)
        assert await store.get("routes", r["id"]) == r

    @pytest_twisted.ensureDeferred
    async def test_update_moves_row_between_foreign_filters(self, store: Any) -> None:
        """After a route moves to another service, where-filters follow it."""
        s1 = await store.insert("services", service("s1"))
        s2 = await store.insert("services", service("s2"))
        r = await store.insert("routes", route(s1, "r"))
        await store.update("routes", dict(r, service=ref(s2)))
        assert await store.all("routes", where={"service": s1["id"]}) == []
        assert [x["id"] for x in await store.all("routes", where={"service": s2["id"]})] == [r["id"]]
        # s1 is no longer referenced, so it can go.
        assert await store.delete("services", s1["id"]) is True

    # -- delete -------------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_delete_returns_true_then_false(self, store: Any) -> None:
        """delete fires True for a stored row, then False once it is gone (and for unknown ids)."""
        row = await store.insert("services", service("s"))
        assert await store.delete("services", row["id"]) is True
        assert await store.get("services", row["id"]) is None
        assert await store.delete("services", row["id"]) is False
        assert await store.delete("services", new_id()) is False

    @pytest_twisted.ensureDeferred
    async def test_delete_restricted_by_reference(self, store: Any) -> None:
        """Deleting a service that routes reference fails with Kong's message and deletes nothing."""
        svc = await store.insert("services", service("s"))
        p = await store.insert("plugins", plugin("cors", service_row=svc))
        r = await store.insert("routes", route(svc, "r"))
        error = await failure_of(store.delete("services", svc["id"]))
        assert isinstance(error, ReferencedByOthers)
        assert (error.entity, error.referencing) == ("services", "routes")
        assert error.message == "an existing 'routes' entity references this 'services' entity"
        assert await store.get("services", svc["id"]) == svc
        assert await store.get("routes", r["id"]) == r
        assert await store.get("plugins", p["id"]) == p

    @pytest_twisted.ensureDeferred
    async def test_delete_cascades_recursively(self, store: Any) -> None:
        """Deleting a team deletes its consumers, their credentials and plugins, and its services."""
        t = await store.insert("teams", team("t"))
        other = await store.insert("teams", team("other"))
        c = await store.insert("consumers", consumer("bob", team=ref(t)))
        kept = await store.insert("consumers", consumer("alice", team=ref(other)))
        cred = await store.insert("keyauth_credentials", credential(c, "secret"))
        kept_cred = await store.insert("keyauth_credentials", credential(kept, "secret2"))
        svc = await store.insert("services", service("s", team=ref(t)))
        p1 = await store.insert("plugins", plugin("acl", consumer_row=c))
        p2 = await store.insert("plugins", plugin("acl", service_row=svc))
        assert await store.delete("teams", t["id"]) is True
        for entity, row in [
            ("teams", t),
            ("consumers", c),
            ("keyauth_credentials", cred),
            ("services", svc),
            ("plugins", p1),
            ("plugins", p2),
        ]:
            assert await store.get(entity, row["id"]) is None, entity
        assert await store.get("consumers", kept["id"]) == kept
        assert await store.get("keyauth_credentials", kept_cred["id"]) == kept_cred
        # The deleted credential's key is free again.
        await store.insert("keyauth_credentials", credential(kept, "secret"))

    @pytest_twisted.ensureDeferred
    async def test_cascade_into_a_restrict_changes_nothing(self, store: Any) -> None:
        """When a cascade reaches a row that is restricted, the whole delete is undone."""
        t = await store.insert("teams", team("t"))
        c = await store.insert("consumers", consumer("bob", team=ref(t)))
        cred = await store.insert("keyauth_credentials", credential(c, "secret"))
        p = await store.insert("plugins", plugin("acl", consumer_row=c))
        svc = await store.insert("services", service("s", team=ref(t)))
        r = await store.insert("routes", route(svc, "r"))
        events: List[ChangeEvent] = []
        store.add_listener(events.append)
        error = await failure_of(store.delete("teams", t["id"]))
        assert isinstance(error, ReferencedByOthers)
        assert (error.entity, error.referencing) == ("services", "routes")
        for entity, row in [
            ("teams", t),
            ("consumers", c),
            ("keyauth_credentials", cred),
            ("plugins", p),
            ("services", svc),
            ("routes", r),
        ]:
            assert await store.get(entity, row["id"]) == row, entity
        assert await store.get_by("keyauth_credentials", "key", "secret") == cred
        assert events == []
        # The indexes were restored too: the key is still taken.
        error = await failure_of(store.insert("keyauth_credentials", credential(c, "secret")))
        assert isinstance(error, UniqueViolation)

    @pytest_twisted.ensureDeferred
    async def test_delete_sets_null_references_to_none(self, store: Any) -> None:
        """Deleting a certificate nulls services.client_certificate (on_delete=null)."""
        cert = await store.insert("certificates", certificate())
        svc = await store.insert("services", service("s", client_certificate=ref(cert)))
        assert await store.delete("certificates", cert["id"]) is True
        assert await store.get("services", svc["id"]) == dict(svc, client_certificate=None)
        assert await store.all("services", where={"client_certificate": cert["id"]}) == []
        assert len(await store.all("services", where={"client_certificate": None})) == 1

    # -- pagination ---------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_pages_of_three_over_ten_rows(self, store: Any) -> None:
        """10 rows with size 3 give pages of 3, 3, 3, 1 in id order; the last has no next offset."""
        ids = sorted([(await store.insert("services", service(f"s{i}")))["id"] for i in range(10)])
        sizes = []
        seen: List[str] = []
        offset = None
        while True:
            rows, offset = await store.page("services", 3, offset)
            sizes.append(len(rows))
            seen += [r["id"] for r in rows]
            if offset is None:
                break
            assert isinstance(offset, str)
        assert sizes == [3, 3, 3, 1]
        assert seen == ids

    @pytest_twisted.ensureDeferred
    async def test_exact_multiple_has_no_empty_last_page(self, store: Any) -> None:
        """6 rows with size 3: the second page is the last (no next offset, no empty page)."""
        for i in range(6):
            await store.insert("services", service(f"s{i}"))
        rows, offset = await store.page("services", 3)
        assert len(rows) == 3 and offset is not None
        rows, offset = await store.page("services", 3, offset)
        assert len(rows) == 3 and offset is None

    @pytest_twisted.ensureDeferred
    async def test_empty_collection_page(self, store: Any) -> None:
        """An empty collection gives ([], None)."""
        assert await store.page("routes", 100) == ([], None)

    @pytest_twisted.ensureDeferred
    async def test_page_survives_deleting_the_last_row_seen(self, store: Any) -> None:
        """An offset stays valid after the row it was taken at is deleted."""
        ids = sorted([(await store.insert("services", service(f"s{i}")))["id"] for i in range(5)])
        rows, offset = await store.page("services", 2)
        await store.delete("services", rows[-1]["id"])
        rows, offset = await store.page("services", 10, offset)
        assert [r["id"] for r in rows] == ids[2:]
        assert offset is None

    @pytest_twisted.ensureDeferred
    async def test_order_by_field_with_ties_and_nulls(self, store: Any) -> None:
        """Consumers list by created_at (nulls first) then id, across page boundaries."""
        stamps = [5, None, 3, 5, 5, 1, None, 3, 8, 5]
        rows = [await store.insert("consumers", consumer(f"u{i}", created_at=s)) for i, s in enumerate(stamps)]

        def key(r: Mapping[str, Any]) -> Any:
            s = r["created_at"]
            return (s is not None, s or 0, r["id"])

        expected = [r["id"] for r in sorted(rows, key=key)]
        for size in (1, 2, 3, 4, 10):
            seen: List[str] = []
            offset = None
            while True:
                page, offset = await store.page("consumers", size, offset)
                seen += [r["id"] for r in page]
                if offset is None:
                    break
            assert seen == expected, size
        assert [r["id"] for r in await store.all("consumers")] == expected

    @pytest_twisted.ensureDeferred
    async def test_where_filters_by_foreign_key(self, store: Any) -> None:
        """where={"service": id} (or {"id": id}) pages only that service's routes."""
        s1 = await store.insert("services", service("s1"))
        s2 = await store.insert("services", service("s2"))
        mine = sorted([(await store.insert("routes", route(s1, f"a{i}")))["id"] for i in range(4)])
        for i in range(3):
            await store.insert("routes", route(s2, f"b{i}"))
        rows, offset = await store.page("routes", 3, where={"service": s1["id"]})
        assert [r["id"] for r in rows] == mine[:3]
        rows, offset = await store.page("routes", 3, offset, where={"service": s1["id"]})
        assert [r["id"] for r in rows] == mine[3:]
        assert offset is None
        rows, _ = await store.page("routes", 10, where={"service": {"id": s1["id"]}})
        assert [r["id"] for r in rows] == mine
        assert await store.page("routes", 10, where={"service": new_id()}) == ([], None)

    @pytest_twisted.ensureDeferred
    async def test_where_filters_by_null_foreign_key_and_unique_field(self, store: Any) -> None:
        """where with None selects rows whose key is null; a unique field filters by value."""
        svc = await store.insert("services", service("s"))
        glob = await store.insert("plugins", plugin("cors"))
        await store.insert("plugins", plugin("cors", service_row=svc))
        named = await store.insert("plugins", plugin("acl", instance_name="my-acl"))
        rows, _ = await store.page("plugins", 10, where={"service": None, "route": None})
        assert sorted(r["id"] for r in rows) == sorted([glob["id"], named["id"]])
        rows, _ = await store.page("plugins", 10, where={"instance_name": "my-acl"})
        assert rows == [named]
        rows, _ = await store.page("plugins", 10, where={"id": glob["id"]})
        assert rows == [glob]

    @pytest_twisted.ensureDeferred
    async def test_where_on_other_fields_fails(self, store: Any) -> None:
        """A where filter on a field that is neither id, unique nor foreign fails."""
        error = await failure_of(store.page("services", 10, where={"host": "x"}))
        assert isinstance(error, UnsupportedFilter)
        error = await failure_of(store.all("services", where={"host": "x"}))
        assert isinstance(error, UnsupportedFilter)

    @pytest.mark.parametrize(
        "offset, reason",
        [
            ("x", "bad base64 encoding"),
            ("!!!!", "bad base64 encoding"),
            ("bm90IGpzb24", "bad json encoding"),
            ("WzEsMiwzXQ", "bad cursor"),
        ],
    )
    @pytest_twisted.ensureDeferred
    async def test_bad_offset_is_invalid_offset(self, store: Any, offset: str, reason: str) -> None:
        """A token that is not ours fails with InvalidOffset and Kong's message."""
        error = await failure_of(store.page("services", 10, offset))
        assert isinstance(error, InvalidOffset)
        assert (error.offset, error.reason) == (offset, reason)
        assert error.message == f"'{offset}' is not a valid offset: {reason}"

    @pytest_twisted.ensureDeferred
    async def test_offsets_are_portable_tokens(self, store: Any) -> None:
        """A token built with encode_offset is accepted (every backend shares the format)."""
        ids = sorted([(await store.insert("services", service(f"s{i}")))["id"] for i in range(3)])
        rows, offset = await store.page("services", 5, encode_offset(ids[0], ids[0]))
        assert [r["id"] for r in rows] == ids[1:]

    # -- all ----------------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_all_returns_every_row_in_order(self, store: Any) -> None:
        """all returns every row in id order, and only the matching ones with where."""
        svc = await store.insert("services", service("s"))
        ids = sorted([(await store.insert("routes", route(svc, f"r{i}")))["id"] for i in range(25)])
        other = await store.insert("routes", route(None, "x"))
        rows = await store.all("routes")
        assert [r["id"] for r in rows] == sorted(ids + [other["id"]])
        assert [r["id"] for r in await store.all("routes", where={"service": svc["id"]})] == ids
        assert await store.all("teams") == []

    # -- listeners ----------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_listeners_see_create_update_delete_in_order(self, store: Any) -> None:
        """Each committed write reaches listeners as a ChangeEvent, in order, with old and new rows."""
        events: List[ChangeEvent] = []
        store.add_listener(events.append)
        row = await store.insert("services", service("s"))
        changed = await store.update("services", dict(row, port=81))
        await store.delete("services", row["id"])
        assert events == [
            ChangeEvent("services", "create", row["id"], None, row),
            ChangeEvent("services", "update", row["id"], row, changed),
            ChangeEvent("services", "delete", row["id"], changed, None),
        ]

    @pytest_twisted.ensureDeferred
    async def test_failed_and_empty_writes_emit_nothing(self, store: Any) -> None:
        """Refused writes and deletes of absent rows reach no listener."""
        row = await store.insert("services", service("s"))
        events: List[ChangeEvent] = []
        store.add_listener(events.append)
        await failure_of(store.insert("services", service("s")))
        await failure_of(store.update("services", service("ghost")))
        await failure_of(store.insert("routes", route({"id": new_id()}, "r")))
        assert await store.delete("services", new_id()) is False
        assert await store.get("services", row["id"]) == row
        assert events == []

    @pytest_twisted.ensureDeferred
    async def test_cascade_emits_one_event_per_row_parent_last(self, store: Any) -> None:
        """A cascading delete emits a delete per row (children before the parent) and null updates."""
        t = await store.insert("teams", team("t"))
        c = await store.insert("consumers", consumer("bob", team=ref(t)))
        cred = await store.insert("keyauth_credentials", credential(c, "k"))
        p = await store.insert("plugins", plugin("acl", consumer_row=c))
        cert = await store.insert("certificates", certificate())
        svc = await store.insert("services", service("s", client_certificate=ref(cert)))
        events: List[ChangeEvent] = []
        store.add_listener(events.append)
        await store.delete("teams", t["id"])
        assert [(e.entity, e.op, e.id) for e in events] == [
            ("keyauth_credentials", "delete", cred["id"]),
            ("plugins", "delete", p["id"]),
            ("consumers", "delete", c["id"]),
            ("teams", "delete", t["id"]),
        ]
        assert events[0].old == cred and events[0].new is None
        events.clear()
        await store.delete("certificates", cert["id"])
        assert events == [
            ChangeEvent("services", "update", svc["id"], svc, dict(svc, client_certificate=None)),
            ChangeEvent("certificates", "delete", cert["id"], cert, None),
        ]

    @pytest_twisted.ensureDeferred
    async def test_failing_listener_does_not_break_writes(self, store: Any) -> None:
        """A listener that raises is logged; the write succeeds and later listeners still run."""
        logged: List[Any] = []

        def observe(event: Mapping[str, Any]) -> None:
            if "log_failure" in event:
                logged.append(event["log_failure"])

        def broken(event: ChangeEvent) -> None:
            raise RuntimeError("listener bug")

        seen: List[str] = []
        store.add_listener(broken)
        store.add_listener(lambda e: seen.append(e.op))
        globalLogPublisher.addObserver(observe)
        try:
            row = await store.insert("services", service("s"))
        finally:
            globalLogPublisher.removeObserver(observe)
        assert await store.get("services", row["id"]) == row
        assert seen == ["create"]
        assert [f.check(RuntimeError) for f in logged] == [RuntimeError]

    @pytest_twisted.ensureDeferred
    async def test_removed_listener_is_not_called(self, store: Any) -> None:
        """remove_listener stops delivery; removing an unknown callback is harmless."""
        events: List[ChangeEvent] = []
        store.add_listener(events.append)
        store.remove_listener(events.append)
        store.remove_listener(lambda e: None)
        await store.insert("services", service("s"))
        assert events == []

    # -- concurrency and isolation ------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_concurrent_inserts_of_one_unique_value(self, store: Any) -> None:
        """Of several concurrent inserts with the same name, exactly one succeeds."""
        attempts = [store.insert("services", service("same")) for _ in range(5)]
        results = await defer.DeferredList(attempts, consumeErrors=True)
        wins = [value for ok, value in results if ok]
        losses = [value.value for ok, value in results if not ok]
        assert len(wins) == 1
        assert len(losses) == 4
        assert all(isinstance(e, UniqueViolation) and e.fields == {"name": "same"} for e in losses)
        assert await store.all("services") == wins

    @pytest_twisted.ensureDeferred
    async def test_rows_are_copies(self, store: Any) -> None:
        """Mutating rows given to or returned by the store never changes what it holds."""
        row = service("s", tags=["a"])
        original = {k: (list(v) if isinstance(v, list) else v) for k, v in row.items()}
        d = store.insert("services", row)
        row["tags"].append("mutated-after-call")
        row["name"] = "changed"
        stored = await d
        assert stored == original
        stored["tags"].append("x")
        (await store.get("services", row["id"]))["tags"].append("y")
        (await store.get_by("services", "name", "s"))["tags"].append("z")
        (await store.all("services"))[0]["tags"].append("w")
        (await store.page("services", 1))[0][0]["tags"].append("v")
        assert await store.get("services", row["id"]) == original

    @pytest_twisted.ensureDeferred
    async def test_event_rows_are_copies(self, store: Any) -> None:
        """Mutating a ChangeEvent's rows does not change the stored row."""
        events: List[ChangeEvent] = []
        store.add_listener(events.append)
        row = await store.insert("services", service("s", tags=["a"]))
        events[0].new["tags"].append("mutated")
        assert await store.get("services", row["id"]) == row

    @pytest_twisted.ensureDeferred
    async def test_many_rows_load_and_list(self, store: Any) -> None:
        """A few hundred rows insert and list through all() and page() consistently."""
        ids = sorted([(await store.insert("consumers", consumer(f"u{i}", created_at=None)))["id"] for i in range(300)])
        assert [r["id"] for r in await store.all("consumers")] == ids
        rows, offset = await store.page("consumers", 1000)
        assert [r["id"] for r in rows] == ids and offset is None

    # -- counters (IStore.increment, the rate-limiting cluster policy) ---------------

    async def _counters_ready(self, store: Any) -> None:
        """Postgres contract schemas are bootstrapped with test-only migrations: add 0004."""
        settings = getattr(store, "settings", None)
        if settings is None:
            return
        from twisted.internet import reactor

        from kongtx.store import migrations
        from kongtx.store.migrations.v0004_ratelimiting_counters import MIGRATION

        await migrations.up(settings, reactor, [MIGRATION])

    @pytest_twisted.ensureDeferred
    async def test_increment_counts_per_key_and_window(self, store: Any) -> None:
        """increment fires with the new value; keys and window starts count separately."""
        await self._counters_ready(store)
        assert await store.increment("k", 60, 120) == 1
        assert await store.increment("k", 60, 120) == 2
        assert await store.increment("k", 60, 120, 5) == 7
        assert await store.increment("k", 120, 120) == 1
        assert await store.increment("other", 60, 120) == 1
        assert await store.increment("k", 60, 120, -1) == 6

    @pytest_twisted.ensureDeferred
    async def test_increment_refuses_past_the_limit(self, store: Any) -> None:
        """With a limit, an addition that would exceed it fires > limit and changes nothing."""
        await self._counters_ready(store)
        assert [await store.increment("k", 0, 60, 1, 2) for _ in range(4)][:2] == [1, 2]
        assert await store.increment("k", 0, 60, 1, 2) > 2
        assert await store.increment("k", 0, 60, 1, None) == 3
        assert await store.increment("fresh", 0, 60, 3, 2) > 2
        assert await store.increment("fresh", 0, 60, 2, 2) == 2

    @pytest_twisted.ensureDeferred
    async def test_concurrent_increments_admit_exactly_the_limit(self, store: Any) -> None:
        """200 concurrent additions against a limit of 50: exactly 50 succeed, values 1..50."""
        await self._counters_ready(store)
        results = await defer.gatherResults(
            [store.increment("busy", 3600, 7200, 1, 50) for _ in range(200)]
        )
        admitted = sorted(v for v in results if v <= 50)
        assert admitted == list(range(1, 51))
        assert await store.increment("busy", 3600, 7200, 0) == 50
