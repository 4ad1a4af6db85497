"""The published OpenAPI document: FastAPI's, completed with what it cannot know by itself.

- **Live limits**: schema nodes marked ``x-limit`` (``schemas.py``, routers) get the bound of
  this deployment: ``embedding_dim`` (the served model's: ``minItems = maxItems``), ``max_k``
  (``maximum``), ``max_batch_items`` and ``max_enrol_items`` (``maxItems``), ``max_list_limit``
  (``maximum``), ``embedding_b64_chars`` (a base64 embedding's exact length),
  ``threshold_bound`` (``minimum = -bound``, ``maximum = bound``: 1 for a cosine threshold,
  1000 for an AS-normalised one). The document is rendered per served embedding dimension and
  threshold units (a model switch may change them).
- **X-Request-ID**: an optional header parameter of every operation, and a response header of
  every answer (``service.api.request_id``); ``Retry-After`` on 429 and 503, ``WWW-Authenticate``
  on 401, ``Allow`` on 405; ``X-Consistency-Token`` on a gallery write's answer.
- **Optional headers** are strings or absent, never ``null`` (FastAPI writes ``str | None`` as
  ``anyOf`` string/null).
- **Links** for stateful clients and testers: an enrolment's item ids lead to the item's
  get / put / delete, a match's id to its feedback, a tenant's id to its keys.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from service.api.request_id import HEADER, REQUEST_ID_PATTERN
from service.domain.consistency import HEADER as CONSISTENCY_HEADER
from service.domain.consistency import TOKEN_PATTERN
from service.settings import Settings

DESCRIPTION = """Threshold-consistent retrieval as a service: 1:N match, 1:1 verify and embed
requests for many tenants, each with its own gallery, decided by one global threshold.

Errors are always `{"code", "message", "detail"}`; `code` is stable. Every answer carries an
`X-Request-ID` (yours, or a generated one): quote it when asking for support. Reference:
`service/README.md`."""

TAGS = [
    {"name": "gallery", "description": "enrol, upsert, list, get and delete items; subjects"},
    {"name": "match", "description": "1:N search and decision, optionally filtered by metadata"},
    {"name": "verify", "description": "1:1 decisions between images, vectors, items, subjects"},
    {"name": "embed", "description": "images to embeddings with the served model"},
    {"name": "feedback", "description": "ground truth for past matches (live FAR/FRR)"},
    {"name": "monitor", "description": "live threshold consistency (admin or tenant view)"},
    {"name": "model", "description": "the served model and its calibration"},
    {"name": "tenants", "description": "admin: tenants and API keys"},
    {"name": "models", "description": "admin: the model registry (stage, activate, rollback)"},
    {"name": "health", "description": "probes and Prometheus metrics"},
]

_LINKS: dict[str, dict[str, dict[str, Any]]] = {
    # operationId -> {status: {link name: link}}
    "enrolItems": {
        "201": {
            "getItem": {
                "operationId": "getItem",
                "parameters": {"item_id": "$response.body#/item_ids/0"},
            },
            "putItem": {
                "operationId": "putItem",
                "parameters": {"item_id": "$response.body#/item_ids/0"},
            },
            "deleteItem": {
                "operationId": "deleteItem",
                "parameters": {"item_id": "$response.body#/item_ids/0"},
            },
        }
    },
    "enrolUpload": {
        "201": {
            "getItem": {
                "operationId": "getItem",
                "parameters": {"item_id": "$response.body#/item_ids/0"},
            }
        }
    },
    "putItem": {
        status: {
            "getItem": {
                "operationId": "getItem",
                "parameters": {"item_id": "$response.body#/item_id"},
            },
            "deleteItem": {
                "operationId": "deleteItem",
                "parameters": {"item_id": "$response.body#/item_id"},
            },
        }
        for status in ("200", "201")
    },
    "getItem": {
        "200": {
            "deleteSubject": {
                "operationId": "deleteSubject",
                "parameters": {"subject": "$response.body#/subject"},
            }
        }
    },
    "match": {
        "200": {
            "sendFeedback": {
                "operationId": "sendFeedback",
                "requestBody": {"match_id": "$response.body#/match_id", "correct": True},
            }
        }
    },
    "createTenant": {
        "201": {
            name: {"operationId": name, "parameters": {"tenant_id": "$response.body#/tenant_id"}}
            for name in ("getTenant", "listKeys", "issueKey", "deleteTenant")
        }
    },
    "issueKey": {
        "201": {
            "revokeKey": {
                "operationId": "revokeKey",
                "parameters": {
                    "tenant_id": "$response.body#/tenant_id",
                    "key_id": "$response.body#/key_id",
                },
            }
        }
    },
}


def operation_id(route: APIRoute) -> str:
    """``create_tenant`` -> ``createTenant`` (routes without an explicit operation id)."""
    first, *rest = route.name.split("_")
    return first + "".join(w.capitalize() for w in rest)


THRESHOLD_BOUND = 1000  # |threshold| of a what-if in as-norm units (the query's own bound)


def install(app: FastAPI, settings: Settings) -> None:
    """Replaces ``app.openapi`` with the rendering described in the module doc."""
    cache: dict[tuple[int | None, str], dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        runtime = getattr(app.state, "runtime", None)
        dim = runtime.serving.manifest.embedding_dim if runtime is not None else None
        units = runtime.serving.manifest.threshold_units if runtime is not None else "cosine"
        if (dim, units) not in cache:
            base = get_openapi(
                title=app.title,
                version=app.version,
                description=DESCRIPTION,
                routes=app.routes,
                tags=TAGS,
            )
            limits = {
                "embedding_dim": dim,
                "max_k": settings.max_k,
                "max_batch_items": settings.max_batch_items,
                "max_enrol_items": max(settings.max_enrol_items, settings.max_batch_items),
                # base64 of embedding_dim float32: its exact length in characters
                "embedding_b64_chars": None if dim is None else (dim * 4 + 2) // 3 * 4,
                "max_list_limit": settings.max_list_limit,
                "threshold_bound": 1 if units == "cosine" else THRESHOLD_BOUND,
            }
            cache[dim, units] = complete(base, limits)
        return cache[dim, units]

    app.openapi = openapi  # type: ignore[method-assign]


def complete(spec: dict[str, Any], limits: dict[str, int | None]) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    _apply_limits(spec, limits)
    id_schema = {"type": "string", "pattern": REQUEST_ID_PATTERN}
    for ops in spec.get("paths", {}).values():
        for method, op in ops.items():
            for param in op.get("parameters", []):
                # an optional header is absent or a string, never null (FastAPI writes
                # ``str | None`` as anyOf string/null, and testers then send "null")
                any_of = param.get("schema", {}).get("anyOf")
                if param.get("in") == "header" and any_of and {"type": "null"} in any_of:
                    rest = [a for a in any_of if a != {"type": "null"}]
                    if len(rest) == 1:
                        extra = {k: v for k, v in param["schema"].items() if k != "anyOf"}
                        param["schema"] = {**rest[0], **extra}
            op.setdefault("parameters", []).append(
                {
                    "name": HEADER,
                    "in": "header",
                    "required": False,
                    "schema": id_schema,
                    "description": "your id for this request (echoed; generated when left out)",
                }
            )
            for status, response in op.get("responses", {}).items():
                content = response.get("content", {})
                if status >= "400" and content and "application/json" not in content:
                    # errors are JSON whatever the route's own media type (/metrics: text)
                    response["content"] = {"application/json": next(iter(content.values()))}
                headers = response.setdefault("headers", {})
                headers[HEADER] = {
                    "description": "the request's id",
                    "required": True,
                    "schema": {"type": "string"},
                }
                if status in ("429", "503"):
                    headers["Retry-After"] = {
                        "description": "seconds to wait before retrying",
                        "schema": {"type": "integer"},
                    }
                if status == "401":
                    headers["WWW-Authenticate"] = {"schema": {"type": "string"}}
                if status < "300" and "gallery" in op.get("tags", ()) and method != "get":
                    headers[CONSISTENCY_HEADER] = {
                        "description": "the change feed's position after this write (with a "
                        "Redis store): send it back with a match or verify to see this write "
                        "on any replica",
                        "schema": {"type": "string", "pattern": TOKEN_PATTERN},
                    }
            for status, links in _LINKS.get(op.get("operationId", ""), {}).items():
                if status in op.get("responses", {}):
                    op["responses"][status]["links"] = copy.deepcopy(links)
    return spec


def _apply_limits(node: Any, limits: dict[str, int | None]) -> None:
    if isinstance(node, dict):
        name = node.get("x-limit")
        value = limits.get(name) if isinstance(name, str) else None
        if value is not None:
            if name == "threshold_bound":
                node["minimum"], node["maximum"] = -value, value
            elif node.get("type") == "array":
                node["maxItems"] = value
                if name == "embedding_dim":
                    node["minItems"] = value
            elif node.get("type") == "string":  # an exact length (embedding_b64_chars)
                node["minLength"] = node["maxLength"] = value
            else:
                node["maximum"] = value
                if isinstance(node.get("default"), int) and node["default"] > value:
                    node["default"] = value
        for v in node.values():
            _apply_limits(v, limits)
    elif isinstance(node, list):
        for v in node:
            _apply_limits(v, limits)
