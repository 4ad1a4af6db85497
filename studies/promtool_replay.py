"""The project's alert rules, evaluated in simulated time on what the service exposed.

A drift alert's ``for:`` is minutes to an hour long; waiting for it on a wall clock makes a
study slow and a test timing-dependent. Instead, the service's ``/metrics`` text at each stage
of a scenario (one scrape per stage: the monitor's gauges stay constant between snapshots, which
are computed from deterministic gallery samples) becomes the input series of a
``promtool test rules`` file, with the scrape and evaluation intervals of
``deploy/prometheus/prometheus.yml`` and the rule files as committed (``for:`` included). The
alerts' state over time is read back from ``ALERTS`` (one expression test per evaluation step,
each expecting nothing: promtool prints what it got).
"""

from __future__ import annotations

import itertools
import math
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))
# the alerts that say the model no longer fits a tenant's (or the fleet's) data
DRIFT_ALERTS = frozenset(
    {
        "TCMSubjectsOpisDegraded",
        "TCMSubjectsOpisPooledDegraded",
        "TCMOpisDegraded",
        "TCMEpsOpisDegraded",
        "TCMTenantInconsistent",
        "TCMTenantLevelDegraded",
        "TCMTenantPairFARHigh",
    }
)
# those of them that name one tenant
TENANT_ALERTS = frozenset(
    {
        "TCMSubjectsOpisDegraded",
        "TCMTenantInconsistent",
        "TCMTenantLevelDegraded",
        "TCMTenantPairFARHigh",
    }
)
_LABELS = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_ALERTS_AT = re.compile(r'expr: "ALERTS", time: (\S+?),')


def parse_duration(text: str) -> float:
    """Seconds of a Prometheus duration such as ``15s``, ``1m30s`` or ``2h``."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def intervals() -> tuple[float, float]:
    """(scrape, evaluation) interval in seconds, from the project's prometheus.yml."""
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())["global"]
    return parse_duration(cfg["scrape_interval"]), parse_duration(cfg["evaluation_interval"])


def referenced_names(rule_files: Iterable[Path] = RULE_FILES) -> set[str]:
    """Every ``tcm_`` series name the rule files mention (the rest of /metrics is left out)."""
    return {m for f in rule_files for m in re.findall(r"\btcm_[a-z0-9_]+", f.read_text())}


def scrape(text: str, names: set[str], *, instance: str = "a") -> dict[str, float]:
    """The samples of one /metrics text the rules read, as promtool series selectors (the
    target labels of the tcm-service job added) -> value."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name not in names:
                continue
            labels = {**s.labels, "job": "tcm-service", "instance": instance}
            body = ",".join(
                f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                for k, v in sorted(labels.items())
            )
            out[f"{s.name}{{{body}}}"] = float(s.value)
    return out


def _value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def series_values(stages: Sequence[tuple[int, dict[str, float]]], total_steps: int) -> dict:
    """promtool ``values`` strings: stage i's samples from its start step to the next stage's;
    a series absent from a stage is missing there (a staleness marker where it disappears)."""
    keys = sorted({k for _, samples in stages for k in samples})
    bounds = [start for start, _ in stages] + [total_steps]
    if bounds[0] != 0 or any(b <= a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"stages must start at step 0 and in order: {bounds}")
    out = {}
    for key in keys:
        tokens, present = [], False
        for (start, samples), end in zip(stages, bounds[1:], strict=True):
            n = end - start
            if key in samples:
                v = _value(samples[key])
                tokens.append(v if n == 1 else f"{v}x{n - 1}")
                present = True
            else:
                if present:  # it disappeared from the scrape: Prometheus marks it stale
                    tokens.append("stale")
                    n -= 1
                if n:
                    tokens.append(f"_x{n}")
                present = False
        out[key] = " ".join(tokens)
    return out


@dataclass(frozen=True)
class AlertState:
    alertname: str
    tenant: str  # '' for an alert over the whole fleet
    action: str  # '' when the rule has none
    state: str  # pending | firing


def _duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def _parse_alerts(output: str) -> dict[float, set[AlertState]]:
    found: dict[float, set[AlertState]] = {}
    for block in output.split("expr: ")[1:]:
        at = _ALERTS_AT.match("expr: " + block)
        if at is None:
            continue
        got = block.split("got:", 1)
        if len(got) < 2:
            continue
        states = set()
        for sample in re.findall(r"\{([^}]*)\}", got[1]):
            labels = dict(_LABELS.findall(sample))
            states.add(
                AlertState(
                    labels["alertname"],
                    labels.get("tenant", ""),
                    labels.get("action", ""),
                    labels["alertstate"],
                )
            )
        found[parse_duration(at.group(1))] = states
    return found


def alert_timeline(
    stages: Sequence[tuple[float, str]],
    *,
    horizon_s: float,
    step_s: float | None = None,
    rule_files: Sequence[Path] = RULE_FILES,
    promtool: str | None = None,
) -> dict[float, set[AlertState]]:
    """The alerts pending or firing at each evaluation step (seconds -> states) until
    ``horizon_s``, when the service's /metrics read ``stages[i][1]`` from ``stages[i][0]``
    seconds on (the first stage at 0), evaluated by promtool on the committed rules.
    ``step_s`` (default: the evaluation interval) is how often the state is read."""
    binary = promtool or shutil.which("promtool")
    if binary is None:
        raise RuntimeError("promtool is not installed: `apt-get install prometheus`")
    scrape_s, eval_s = intervals()
    names = referenced_names(rule_files)
    total = int(horizon_s // scrape_s) + 1
    steps = [(math.ceil(t / scrape_s), scrape(text, names)) for t, text in stages]
    inputs = series_values(steps, total)
    step_s = step_s or eval_s
    times = [i * step_s for i in range(int(horizon_s // step_s) + 1)]
    doc = {
        "rule_files": [str(f) for f in rule_files],
        "evaluation_interval": _duration(eval_s),
        "tests": [
            {
                "interval": _duration(scrape_s),
                "input_series": [{"series": k, "values": v} for k, v in inputs.items()],
                "promql_expr_test": [
                    {"expr": "ALERTS", "eval_time": _duration(t), "exp_samples": []} for t in times
                ],
            }
        ],
    }
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "replay_test.yml"
        f.write_text(yaml.safe_dump(doc, width=1_000_000))
        r = subprocess.run(
            [binary, "test", "rules", str(f)], capture_output=True, text=True, timeout=600
        )
    out = r.stdout + r.stderr
    found = _parse_alerts(out)
    if r.returncode != 0 and not found:
        raise RuntimeError(f"promtool test rules failed without alerts to read:\n{out[-3000:]}")
    return {t: found.get(t, set()) for t in times}


def first_seen(
    timeline: dict[float, set[AlertState]], *, since: float, tenant: str, state: str
) -> dict[str, float]:
    """Per (alertname/action) of ``tenant`` (a drift alert), seconds after ``since`` at which
    it was first in ``state`` (or firing, for ``pending``)."""
    states = {"pending": {"pending", "firing"}, "firing": {"firing"}}[state]
    seen: dict[str, float] = {}
    for t in sorted(timeline):
        for a in timeline[t]:
            if a.tenant == tenant and a.alertname in DRIFT_ALERTS and a.state in states:
                seen.setdefault(f"{a.alertname}/{a.action or '-'}", t - since)
    return seen


def rule_for_seconds(
    alertnames: Sequence[str], rule_files: Sequence[Path] = RULE_FILES
) -> dict[str, list[float]]:
    """Each alert's ``for:`` in seconds as committed (one per rule of that name)."""
    out: dict[str, list[float]] = {a: [] for a in alertnames}
    for f in rule_files:
        for group in yaml.safe_load(f.read_text())["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") in out:
                    out[rule["alert"]].append(parse_duration(rule.get("for", "0s")))
    return out
