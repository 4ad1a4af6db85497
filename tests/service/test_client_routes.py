"""Every operation of the service's API has a ``tcm_client`` method, and every client method
calls an operation the service has (issue 30: ``match_batch`` and the monitor reference call
were missing, 32 of 34 routes covered).

The app's operations are enumerated from the OpenAPI document ``create_app`` renders; each
client route builds its request (nothing is sent) and its method and path are matched against
the operations' path templates. A route no client method may call would be
listed in ``NOT_IN_CLIENT`` with the reason; there is none."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from service.app import create_app
from tcm_client import Client
from tcm_client.client import _Routes, route
from tests.service.conftest import make_settings

# (method, path) -> why the client has no method for it
NOT_IN_CLIENT: dict[tuple[str, str], str] = {}

IMG = "AAAA"
# the arguments each client route is built with (a new route must be added here)
SAMPLE: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "create_tenant": (("n",), {}),
    "list_tenants": ((), {}),
    "get_tenant": (("t",), {}),
    "delete_tenant": (("t",), {}),
    "issue_key": (("t",), {}),
    "list_keys": (("t",), {}),
    "revoke_key": (("t", "k"), {}),
    "list_models": ((), {}),
    "stage_model": (("/a",), {}),
    "activate_model": (("v",), {}),
    "rollback_model": ((), {}),
    "unembedded_items": (("v",), {}),
    "enrol": (([{"subject": "s", "embedding": [1.0]}],), {}),
    "enrol_columns": ((np.ones((1, 2)), ["s"]), {}),
    "enrol_raw": (([{"subject": "s"}],), {}),
    "enrol_upload": ((b"x",), {"subject": "s"}),
    "put_item": (("i",), {"subject": "s", "embedding": [1.0]}),
    "list_items": ((), {}),
    "get_item": (("i",), {}),
    "delete_item": (("i",), {}),
    "list_subjects": ((), {}),
    "delete_subject": (("s",), {}),
    "match": ((), {"embedding": [1.0]}),
    "match_batch": ((np.ones((1, 2)),), {}),
    "match_upload": ((b"x",), {}),
    "verify": (({"item_id": "a"}, {"item_id": "b"}), {}),
    "verify_upload": ((b"a", b"b"), {}),
    "embed": (([IMG],), {}),
    "embed_upload": ((b"x",), {}),
    "feedback": (("m",), {"correct": True}),
    "monitor": ((), {}),
    "remeasure_reference": ((), {}),
    "model": ((), {}),
    "healthz": ((), {}),
    "readyz": ((), {}),
    "metrics": ((), {}),
}


def pattern(template: str) -> re.Pattern[str]:
    """``/v1/gallery/{item_id}`` -> a regex of the paths it serves (a parameter is a segment)."""
    parts = re.split(r"(\{[^}]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


def test_every_api_operation_has_a_client_method(artefact: Path, tmp_path: Path) -> None:
    app = create_app(make_settings(artefact, {"store_url": f"sqlite:///{tmp_path / 't.db'}"}))
    operations = {
        (method.upper(), path): pattern(path)
        for path, ops in app.openapi()["paths"].items()
        for method in ops
    }
    assert len(operations) >= 35
    names = sorted(n for n, v in vars(_Routes).items() if isinstance(v, route))
    assert names == sorted(SAMPLE), "add the new client route to SAMPLE"
    client = Client("http://tcm", "k")
    covered: dict[tuple[str, str], list[str]] = {}
    for name in names:
        args, kwargs = SAMPLE[name]
        call = getattr(Client, name).build(client, *args, **kwargs)
        hits = [
            (method, path)
            for (method, path), regex in operations.items()
            if method == call.method and regex.fullmatch(call.path)
        ]
        assert hits, f"{name} calls {call.method} {call.path}: no such operation"
        # a literal path wins over a parameter (/v1/gallery/columns is no item id)
        literal = [h for h in hits if "{" not in h[1]]
        covered.setdefault((literal or hits)[0], []).append(name)
    client.close()
    missing = sorted(set(operations) - set(covered) - set(NOT_IN_CLIENT))
    assert missing == [], f"operations without a client method: {missing}"
    assert covered[("POST", "/v1/match/batch")] == ["match_batch"]
    assert covered[("POST", "/v1/monitor/reference")] == ["remeasure_reference"]
    assert covered[("POST", "/v1/gallery/columns")] == ["enrol_columns"]
    assert sorted(covered[("POST", "/v1/gallery")]) == ["enrol", "enrol_raw"]
