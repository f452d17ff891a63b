"""Kong's error bodies: codes, names, statuses and message strings."""

from __future__ import annotations

import pytest

from kongtx import errors

UUID = "9748f662-7711-4a90-8186-dc02f10eb0f5"


@pytest.mark.parametrize(
    "error, status, body",
    [
        (
            errors.SchemaViolation({"name": "required field missing"}),
            400,
            {
                "code": 2,
                "name": "schema violation",
                "message": "schema violation (name: required field missing)",
                "fields": {"name": "required field missing"},
            },
        ),
        (
            errors.UniqueViolation({"name": "x"}),
            409,
            {
                "code": 5,
                "name": "unique constraint violation",
                "message": "UNIQUE violation detected on '{name=\"x\"}'",
                "fields": {"name": "x"},
            },
        ),
        (
            errors.UniqueViolation(
                {"consumer": None, "name": "basic-auth", "route": None, "service": {"id": UUID}}
            ),
            409,
            {
                "code": 5,
                "name": "unique constraint violation",
                "message": "UNIQUE violation detected on '{consumer=null,name=\"basic-auth\","
                "route=null,service={id=\"%s\"}}'" % UUID,
                "fields": {
                    "consumer": None,
                    "name": "basic-auth",
                    "route": None,
                    "service": {"id": UUID},
                },
            },
        ),
        (
            errors.ForeignKeyViolation.invalid_reference({"id": UUID}, "service", "services"),
            400,
            {
                "code": 4,
                "name": "foreign key violation",
                "message": "the foreign key '{id=\"%s\"}' does not reference an existing "
                "'services' entity." % UUID,
                "fields": {"service": {"id": UUID}},
            },
        ),
        (
            errors.ForeignKeyViolation.restricted("services", "routes"),
            400,
            {
                "code": 4,
                "name": "foreign key violation",
                "message": "an existing 'routes' entity references this 'services' entity",
                "fields": {"@referenced_by": "routes"},
            },
        ),
        (
            errors.ForeignKeysUnresolved({"service": {"name": ("non-existing", "services")}}),
            400,
            {
                "code": 13,
                "name": "foreign keys unresolved",
                "message": "foreign key unresolved (service.name: the foreign key cannot be "
                "resolved with '{name=\"non-existing\"}' for an existing 'services' entity)",
                "fields": {
                    "service": {
                        "name": "the foreign key cannot be resolved with "
                        "'{name=\"non-existing\"}' for an existing 'services' entity"
                    }
                },
            },
        ),
        (
            errors.InvalidOffset("x"),
            400,
            {"code": 7, "name": "invalid offset", "message": "'x' is not a valid offset: bad base64 encoding"},
        ),
        (
            errors.InvalidSize.not_a_number(),
            400,
            {"code": 9, "name": "invalid size", "message": "size must be a number"},
        ),
        (
            errors.InvalidSize.out_of_range(1000),
            400,
            {"code": 9, "name": "invalid size", "message": "size must be an integer between 1 and 1000"},
        ),
        (errors.NotFound(), 404, {"message": "Not found"}),
        (errors.MethodNotAllowed(), 405, {"message": "Method not allowed"}),
        (errors.DatabaseError("connection refused"), 500, {"message": "An unexpected error occurred"}),
        (
            errors.OperationUnsupported("cannot create 'routes' entities when not using a database"),
            405,
            {
                "code": 12,
                "name": "operation unsupported",
                "message": "cannot create 'routes' entities when not using a database",
            },
        ),
        (errors.BadRequest("Cannot parse JSON body"), 400, {"message": "Cannot parse JSON body"}),
        (errors.UnsupportedMediaType(), 415, {"message": "Unsupported Media Type"}),
        (errors.PayloadTooLarge(), 413, {"message": "Request size limit exceeded"}),
    ],
)
def test_error_bodies(error: errors.KongError, status: int, body: dict) -> None:
    """Each error answers with Kong's status and exact body."""
    assert error.status == status
    assert error.body() == body


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"host": "required field missing"}, "schema violation (host: required field missing)"),
        (
            {"path": "should start with: /", "host": "required field missing"},
            "2 schema violations (host: required field missing; path: should start with: /)",
        ),
        (
            {"@entity": ["must set one of 'methods' when 'protocols' is 'http'"]},
            "schema violation (must set one of 'methods' when 'protocols' is 'http')",
        ),
        (
            {
                "protocols": ["expected one of: http"],
                "service": {"protocol": "expected one of: http"},
            },
            "2 schema violations (protocols.1: expected one of: http; "
            "service.protocol: expected one of: http)",
        ),
        (
            {"paths": [None, "bad"], "@entity": ["e1", "e2"], "a": "x"},
            "4 schema violations (e1; e2; a: x; paths.2: bad)",
        ),
    ],
)
def test_schema_violation_message(fields: dict, message: str) -> None:
    """Entity errors first, then fields sorted, nested as parent.child, items 1-based."""
    assert errors.SchemaViolation(fields).message == message


@pytest.mark.parametrize(
    "value, rendered",
    [
        ({"name": "x"}, '{name="x"}'),
        ({"b": 1, "a": None}, "{a=null,b=1}"),
        ({"x-y": True}, '{["x-y"]=true}'),
        ([1, "a"], '{1,"a"}'),
        ('q"uote', '"q\\"uote"'),
    ],
)
def test_lua_repr(value: object, rendered: str) -> None:
    """Lua-table rendering as Penlight's pretty.write(v, "") prints it."""
    assert errors.lua_repr(value) == rendered


def test_codes_match_kong() -> None:
    """The 21 codes and names are Kong's."""
    assert errors.CODES["FOREIGN_KEYS_UNRESOLVED"] == 13
    assert errors.NAMES[19] == "referenced by others"
    assert sorted(errors.NAMES) == list(range(1, 22))
