"""The shard-groups layout on Kubernetes (issue 31 item 5, ``deploy/k8s/overlays/shard-groups``):
a Deployment, HPA and PDB per group, generated from the base's so they cannot drift, each
group's pods told their group and an address the other replicas reach, every group behind the
one Service, the store a Redis Cluster with acknowledged writes."""

from __future__ import annotations

import importlib.util
import re
from typing import Any

import pytest

from tests.deploy.test_k8s import K8S, built, disruptions_allowed, one

GROUPS = ("g1", "g2", "g3")
_spec = importlib.util.spec_from_file_location("build_shard_groups", K8S / "build_shard_groups.py")
assert _spec is not None and _spec.loader is not None
build_shard_groups = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_shard_groups)


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_the_committed_groups_are_generated_from_the_base() -> None:
    assert build_shard_groups.committed_groups() == GROUPS
    assert build_shard_groups.main(["--check"]) == 0
    # a fourth group is one command: its objects are the others' with its name
    text = build_shard_groups.render((*GROUPS, "g4"))
    assert len(re.findall(r"^kind: Deployment$", text, re.M)) == 4 and "name: tcm-g4" in text
    with pytest.raises(ValueError, match="lower-case"):
        build_shard_groups.group_objects("G_1")
    with pytest.raises(ValueError, match="distinct"):
        build_shard_groups.render(("g1", "g1"))


def test_each_group_is_its_own_deployment_scaled_and_drained_alone() -> None:
    manifests = built("overlays/shard-groups")
    base = one(built("overlays/cpu"), "Deployment", "tcm")
    svc = one(manifests, "Service", "tcm")
    pods: dict[str, dict[str, Any]] = {}
    for group in GROUPS:
        dep = one(manifests, "Deployment", f"tcm-{group}")
        tpl = dep["spec"]["template"]
        pods[group] = tpl["metadata"]["labels"]
        assert pods[group]["tcm.io/shard-group"] == group
        assert _matches(dep["spec"]["selector"]["matchLabels"], pods[group])
        # the same pod as the one-Deployment layout's, but for its group's settings
        (c,) = tpl["spec"]["containers"]
        (b,) = base["spec"]["template"]["spec"]["containers"]
        assert {k: v for k, v in c.items() if k != "env"} == {
            k: v for k, v in b.items() if k != "env"
        }
        env = [e["name"] for e in c["env"]]
        values = {e["name"]: e.get("value") for e in c["env"]}
        assert values["TCM_SHARD_GROUP"] == group
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
        assert values["TCM_ADVERTISE_URL"] == f"http://$(POD_IP):{port}"
        assert env.index("POD_IP") < env.index("TCM_ADVERTISE_URL")  # expanded in order
        pod_ip = next(e for e in c["env"] if e["name"] == "POD_IP")
        assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        hpa = one(manifests, "HorizontalPodAutoscaler", f"tcm-{group}")
        assert hpa["spec"]["scaleTargetRef"]["name"] == f"tcm-{group}"
        assert hpa["spec"]["minReplicas"] >= 2  # a group survives one pod's loss
        pdb = one(manifests, "PodDisruptionBudget", f"tcm-{group}")
        for n in range(hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"] + 1):
            assert disruptions_allowed(pdb, n) >= 1  # a drain never hangs
        spread = tpl["spec"]["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"]
        assert spread["tcm.io/shard-group"] == group
    for group in GROUPS:
        # each group's PDB and Deployment select its own pods only; the Service every group's
        pdb = one(manifests, "PodDisruptionBudget", f"tcm-{group}")
        dep = one(manifests, "Deployment", f"tcm-{group}")
        for other, labels in pods.items():
            same = other == group
            assert _matches(pdb["spec"]["selector"]["matchLabels"], labels) is same
            assert _matches(dep["spec"]["selector"]["matchLabels"], labels) is same
        assert _matches(svc["spec"]["selector"], pods[group])


def test_the_settings_are_a_grouped_replica_on_redis_cluster() -> None:
    from service.settings import ClusterURL, Settings

    cm = one(built("overlays/shard-groups"), "ConfigMap", "tcm-config")
    values = {k.removeprefix("TCM_").lower(): v for k, v in cm["data"].items()}
    settings = Settings(
        **values,
        admin_token="x" * 32,
        shard_group="g1",
        advertise_url="http://10.0.0.7:8000",
    )
    assert isinstance(ClusterURL.parse(settings.store_url), ClusterURL)
    assert settings.redis_wait_replicas == 1
    assert settings.redis_wait_timeout_ms < settings.store_timeout_s * 1000
    assert re.fullmatch(r"redis\+cluster://tcm-redis-cluster:\d+", settings.store_url)


@pytest.mark.redis
def test_the_scheduled_rebalance_runs_a_command_the_cli_takes() -> None:
    """The CronJob is suspended until turned on, never runs twice at once, reads the same
    ConfigMap as the replicas, and its command runs: against a real Redis table of two groups
    and one lopsided pair of tenants it prints the plan and makes no move under --min-gain."""
    import json
    import uuid

    from typer.testing import CliRunner

    from service.cli import app
    from service.domain.placement import Placement
    from service.store.base import ApiKey, NewItem, Tenant
    from service.store.redis_store import RedisStore
    from tests.service.conftest import REDIS_URL, redis_cleanup

    cron = one(built("overlays/shard-groups"), "CronJob", "tcm-rebalance")
    assert cron["spec"]["suspend"] is True and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": "tcm-config"}}]
    command = container["command"]
    assert command[:2] == ["tcm-serve", "placement"] and "--apply" in command
    gain = float(command[command.index("--min-gain") + 1])
    assert 0 < gain < 1

    prefix = f"tcmtest:{uuid.uuid4().hex}:"
    store = RedisStore(REDIS_URL, prefix=prefix)
    try:
        table = Placement(1, ("g1", "g2"), explicit=(("a", "g1"), ("b", "g1")))
        assert store.put_placement(table.to_doc(), expected_rev=0)
        # two tenants in g1 by hand, of 10 and 9 items: balancing would move the smaller
        # one and shrink g1 by 9/19 = 47%, above the committed gain, under the 50% asked here
        for name, n in (("a", 10), ("b", 9)):
            store.create_tenant(Tenant(name, name, 1.0), ApiKey(f"k{name}", name, "h" * 64, 1.0))
            vectors = [[1.0] + [0.0] * 7] * n
            store.add_items(
                name,
                [NewItem(f"x{j}", "s", v) for j, v in enumerate(vectors)],
                model_version="v",
                created_at=1.0,
            )
        env = {"TCM_STORE_URL": REDIS_URL, "TCM_REDIS_KEY_PREFIX": prefix}
        args = [*command[1:], "--min-gain", "0.5"]  # the committed command, a higher bar
        result = CliRunner().invoke(app, args, env=env)
        assert result.exit_code == 0, result.output
        assert "no move made" in result.output
        plan = json.loads(result.output[: result.output.index("no move made")])
        assert plan["items_per_group_now"] == {"g1": 19, "g2": 0}
        assert plan["largest_group_drop"] > gain  # the committed command would move it
    finally:
        store.close()
        redis_cleanup(REDIS_URL, prefix)
