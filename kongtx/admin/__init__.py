"""The Admin API: generic CRUD over the entity schemas, node endpoints."""

from __future__ import annotations

from kongtx.admin.resource import AdminRequest, AdminResource, make_site

__all__ = ["AdminResource", "AdminRequest", "make_site"]
