"""``tcm-serve``: run the service with uvicorn, and the operator's commands around it.

``tcm-serve [--host --port]`` serves. Settings come from ``TCM_*`` environment variables (see
:mod:`service.settings`). Without ``TCM_ADMIN_TOKEN`` a fresh admin token is generated and
printed once: it is valid for this process only, so set the variable for anything but a trial.
It logs to stderr, one JSON object per line (:class:`service.logs.JsonFormatter`), uvicorn's
own lines included; uvicorn's access log is off (it printed raw paths and queries, secrets a
client pasted there included): each request is logged once by the app, redacted
(:mod:`service.api.request_id`).

``tcm-serve export-dataset --out DIR`` writes the gallery of record (stored images by tenant and
subject) and the labelled feedback as a dataset ``tcm-train`` reads (``service.ops.export``), from
the store ``TCM_STORE_URL`` names. ``tcm-serve models list|stage|activate|rollback`` drive a
running service's model registry over its admin API (``--url``, ``TCM_ADMIN_TOKEN``);
``tcm-serve tenants create|list|keys|issue-key|revoke-key`` its tenants and API keys, so that
operators need no curl. They talk to the service through ``tcm_client`` (one HTTP client, one
retry policy).
``tcm-serve import FILE`` streams embeddings (.npy, JSONL or Parquet) into a tenant's gallery
over the API (``TCM_API_KEY``), resumably (``service.ops.importer``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import uvicorn
from pydantic import SecretStr, ValidationError
from rich.console import Console

from service.logs import ExplainedStartupFailure, JsonFormatter
from service.settings import Settings

if TYPE_CHECKING:
    from service.domain.placement import Placement
    from service.store import Store
    from tcm_client import Client


def settings_help() -> str:
    """Every ``TCM_*`` setting with its default and description (the --help epilog)."""
    lines = ["Settings (environment variables; a bad value stops start-up):"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = (
            "unset"
            if default is None
            else (str(default) if not isinstance(default, bool) else str(default).lower())
        )
        desc = f": {field.description}" if field.description else ""
        lines.append(f"TCM_{name.upper()} (default {shown}){desc}")
    from rich.markup import escape

    return "\n\n".join(escape(line) for line in lines)


app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="Serve a threshold-consistent embedding model.",
)
models_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The model registry of a running service (admin API).",
)
app.add_typer(models_app, name="models")
tenants_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Tenants and their API keys of a running service (admin API).",
)
app.add_typer(tenants_app, name="tenants")
console = Console(stderr=True, soft_wrap=True)  # paths and messages stay on one line


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        console.print(f"[red]invalid settings (TCM_* environment variables):[/red]\n{exc}")
        raise typer.Exit(2) from exc


def _open_store(settings: Settings) -> Store:
    """The store TCM_STORE_URL names; a message and exit status 1 when it cannot be opened."""
    from service.errors import StoreUnavailableError
    from service.store import open_store

    try:
        return open_store(settings)
    except StoreUnavailableError as exc:
        console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(1) from exc


def _check_artefact(path: Path) -> None:
    """A missing or unreadable artefact is one line and exit code 2, not a traceback."""
    from tcm import read_manifest
    from tcm.artefact import WEIGHTS_FILE

    try:
        read_manifest(path)
        if not (path / WEIGHTS_FILE).is_file():
            raise ValueError(f"no {WEIGHTS_FILE} in {path}")
    except (ValueError, OSError) as exc:
        console.print(f"[red]cannot serve the artefact at {path} (TCM_ARTEFACT_PATH): {exc}[/red]")
        raise typer.Exit(2) from exc


@app.callback(invoke_without_command=True, epilog=settings_help())
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn/python log level")] = "info",
) -> None:
    """Loads the artefact at TCM_ARTEFACT_PATH (or the registry's active one) and serves the
    v1 API; with a command, runs that instead."""
    if ctx.invoked_subcommand is not None:
        return
    handler = logging.StreamHandler()  # stderr
    handler.setFormatter(JsonFormatter())
    # imported here: the operator's commands (import, models, export-dataset) start without the
    # app's imports (torch, FAISS: ~1.5 s of a 2-core machine's time per invocation)
    from service.app import create_app
    from service.engine.faces import FacesExtraMissing
    from service.store import StoreInUseError

    handler.addFilter(ExplainedStartupFailure([FacesExtraMissing, StoreInUseError]))
    logging.basicConfig(level=log_level.upper(), handlers=[handler])
    logging.captureWarnings(True)
    settings = _settings()
    _check_artefact(settings.artefact_path)
    if settings.admin_token is None:
        token = secrets.token_urlsafe(32)
        settings = settings.model_copy(update={"admin_token": SecretStr(token)})
        console.print(
            "[yellow]TCM_ADMIN_TOKEN is not set; admin token for this process "
            "(shown once):[/yellow]"
        )
        console.print(token, markup=False, highlight=False)
    # log_config=None: uvicorn's loggers propagate to the JSON handler above; access_log=False:
    # the app logs each request itself (redacted), uvicorn would log the raw target again
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level.lower(),
        log_config=None,
        access_log=False,
    )


@app.command("placement")
def placement_cmd(
    groups: Annotated[
        str | None,
        typer.Option(help="the shard groups, comma-separated (e.g. g1,g2,g3): writes a new table"),
    ] = None,
    pin: Annotated[
        list[str] | None,
        typer.Option(help="TENANT=GROUP: place this tenant by hand (repeat; e.g. big tenants)"),
    ] = None,
    move: Annotated[
        str | None,
        typer.Option(
            help="TENANT=GROUP: move this tenant to GROUP live (its requests keep being "
            "answered throughout); waits until the move is done"
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="seconds --move waits for the replicas before giving up")
    ] = 300.0,
    balance: Annotated[
        bool,
        typer.Option(
            "--balance",
            help="print a size-aware placement (by each tenant's item count) and the moves "
            "that reach it; with --apply, make those moves live, one after another",
        ),
    ] = False,
    apply: Annotated[
        bool, typer.Option("--apply", help="with --balance or --retire: make the moves")
    ] = False,
    min_gain: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="with --balance --apply: move only if the plan shrinks the largest group by "
            "at least this fraction (e.g. 0.1), so that a scheduled run moves nobody for a "
            "small gain",
        ),
    ] = 0.0,
    retire: Annotated[
        str | None,
        typer.Option(
            help="GROUP: print where its tenants go (largest first, to the groups holding the "
            "fewest items); with --apply, move them live, then drop GROUP from the table"
        ),
    ] = None,
) -> None:
    """Shows the shard groups' placement table in the store (TCM_STORE_URL), writes the next
    version of it (--groups, --pin): replicas started with TCM_SHARD_GROUP read it within
    TCM_PLACEMENT_POLL_S and load the tenants their group now holds; or moves a tenant live
    (--move), evens the groups out (--balance) or empties a group and drops it (--retire).
    A new set of groups keeps every existing tenant where it is (pinned), so that adding a
    group moves no tenant without --move."""
    from service.errors import StoreUnavailableError

    settings = _settings()
    store = _open_store(settings)
    try:
        if move is not None:
            _move(store, move, settings.placement_poll_s, timeout)
            return
        if balance:
            _balance(store, apply, min_gain, settings.placement_poll_s, timeout)
            return
        if retire is not None:
            _retire(store, retire, apply, settings.placement_poll_s, timeout)
            return
        if apply:
            raise ValueError("--apply goes with --balance or --retire")
        if groups is None and not pin:
            doc, rev = store.get_placement()
            _print({"revision": rev, "table": doc})
            return
        names = tuple(g.strip() for g in (groups or "").split(",") if g.strip())
        _print(_write_table(store, names, pin or []))
    except (ValueError, TimeoutError, StoreUnavailableError) as exc:
        console.print(f"[red]{getattr(exc, 'message', exc)}[/red]")
        raise typer.Exit(1) from exc
    finally:
        store.close()


def _write_table(store: Store, groups: tuple[str, ...], pins: list[str]) -> dict[str, Any]:
    """The next version of the table, with ``groups`` (none: the current ones) and the
    ``TENANT=GROUP`` pins; an existing tenant the new groups would rehash is pinned where it
    is. Returns what was written, with the store's revision."""
    from service.domain.placement import Placement

    doc, rev = store.get_placement()
    current = None if doc is None else Placement.from_doc(doc)
    names = groups or (current.groups if current is not None else ())
    explicit = dict(current.explicit) if current is not None else {}
    if current is not None and names != current.groups:  # nobody moves unasked
        after = Placement(0, names, tuple(explicit.items()))
        for t in store.list_tenants():
            if after.owner(t.tenant_id) != current.owner(t.tenant_id):
                explicit[t.tenant_id] = current.owner(t.tenant_id)
    for entry in pins:
        tenant, sep, group = entry.partition("=")
        if not sep or group not in names:
            raise ValueError(f"--pin {entry!r}: give TENANT=GROUP with GROUP among {names}")
        explicit[tenant] = group
    lost = sorted({g for g in explicit.values() if g not in names})
    if lost:
        raise ValueError(
            f"tenants are placed in groups {lost}, which --groups leaves out: move them "
            "first (--move, or --retire GROUP --apply), or --pin them elsewhere"
        )
    table = Placement.from_doc(
        {
            "version": (current.version if current is not None else 0) + 1,
            "groups": list(names),
            "explicit": [[t, g] for t, g in explicit.items()],
            "moves": [] if current is None else current.to_doc()["moves"],
        }
    )
    if not store.put_placement(table.to_doc(), expected_rev=rev):
        raise ValueError("the table changed while this ran: run it again")
    return {"revision": rev + 1, "table": table.to_doc()}


def _move(store: Store, entry: str, poll_s: float, timeout_s: float) -> None:
    """``tcm-serve placement --move TENANT=GROUP``: drives the move, printing each step."""
    from service.domain.moves import Step, move_tenant
    from service.domain.shard_groups import LIVE_POLLS

    tenant, sep, group = entry.partition("=")
    if not sep or not tenant or not group:
        raise ValueError(f"--move {entry!r}: give TENANT=GROUP")

    def said(step: Step) -> None:
        console.print(
            f"{step.seconds:7.2f} s  {step.name}: table version {step.table.version}",
            markup=False,
        )

    move_tenant(
        store,
        tenant,
        group,
        max_age_s=LIVE_POLLS * poll_s,
        poll_s=poll_s / 2,
        timeout_s=timeout_s,
        on_step=said,
    )
    console.print(f"tenant {tenant} now in group {group}", markup=False)


def _balance(store: Store, apply: bool, min_gain: float, poll_s: float, timeout_s: float) -> None:
    """``tcm-serve placement --balance [--apply [--min-gain F]]``: the size-aware plan, and
    its moves. With --apply, moves a stopped run left under way are finished first (to their
    recorded targets), then the plan is made from the table as it is."""
    from service.domain.placement import balanced, largest_group_drop

    table = _table(store)
    if apply and table.moves:
        for under_way in table.moves:
            console.print(
                f"finishing the move of {under_way.tenant} to {under_way.target}", markup=False
            )
            _move(store, f"{under_way.tenant}={under_way.target}", poll_s, timeout_s)
        table = _table(store)
    sizes = _item_counts(store)
    plan = balanced(sizes, table)
    moves = {t: g for t, g in plan.items() if table.owner(t) != g}
    now = _loads(sizes, {t: table.owner(t) for t in sizes}, table)
    after = _loads(sizes, plan, table)
    drop = largest_group_drop(now, after)
    _print(
        {
            "items_per_group_now": now,
            "items_per_group_balanced": after,
            "largest_group_drop": round(drop, 4),
            "moves": [{"tenant": t, "items": sizes[t], "to": g} for t, g in moves.items()],
        }
    )
    if not apply:
        return
    if moves and drop < min_gain:
        console.print(
            f"no move made: the plan shrinks the largest group by {drop:.1%}, "
            f"under --min-gain {min_gain:.1%}",
            markup=False,
        )
        return
    for tenant, group in moves.items():
        _move(store, f"{tenant}={group}", poll_s, timeout_s)


def _retire(store: Store, group: str, apply: bool, poll_s: float, timeout_s: float) -> None:
    """``tcm-serve placement --retire GROUP [--apply]``: where its tenants go; with --apply
    those moves, live, then the table without the group (its replicas then hold nothing and
    can be stopped)."""
    from service.domain.placement import retiring

    table = _table(store)
    sizes = _item_counts(store)
    plan = retiring(sizes, table, group)
    owner = {t: plan.get(t, table.owner(t)) for t in sizes}
    _print(
        {
            "retire": group,
            "items_per_group_now": _loads(sizes, {t: table.owner(t) for t in sizes}, table),
            "items_per_group_after": _loads(sizes, owner, table),
            "moves": [{"tenant": t, "items": sizes[t], "to": g} for t, g in plan.items()],
        }
    )
    if not apply:
        return
    for tenant, target in plan.items():
        _move(store, f"{tenant}={target}", poll_s, timeout_s)
    rest = tuple(g for g in _table(store).groups if g != group)  # as it is after the moves
    _print(_write_table(store, rest, []))
    console.print(
        f"group {group} retired: its replicas hold no tenant now and can be stopped",
        markup=False,
    )


def _table(store: Store) -> Placement:
    """The placement table as it is now; there must be one."""
    from service.domain.placement import Placement

    doc, _ = store.get_placement()
    if doc is None:
        raise ValueError("there is no placement table: write one first (--groups)")
    return Placement.from_doc(doc)


def _item_counts(store: Store) -> dict[str, int]:
    """Every tenant's gallery items (what --balance and --retire weigh groups by)."""
    return {t.tenant_id: store.count_items(t.tenant_id) for t in store.list_tenants()}


def _loads(sizes: dict[str, int], owner: dict[str, str], table: Placement) -> dict[str, int]:
    """Items per group of ``table`` when each tenant is in ``owner``'s group."""
    return {g: sum(n for t, n in sizes.items() if owner[t] == g) for g in table.groups}


@app.command("export-dataset")
def export_dataset_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="new folder for the dataset")],
    tenant: Annotated[
        list[str] | None,
        typer.Option("--tenant", help="export only this tenant (repeat; e.g. the consenting ones)"),
    ] = None,
    min_images: Annotated[
        int, typer.Option(help="leave out subjects with fewer stored images")
    ] = 2,
) -> None:
    """Writes the stored gallery images (a class per tenant and subject) and the labelled
    feedback into a dataset folder tcm-train reads (dataset=imagefolder)."""
    from service.errors import StoreUnavailableError
    from service.ops.export import export_dataset

    settings = _settings()
    url = settings.store_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        console.print(
            f"[red]no store at {url} (TCM_STORE_URL, relative to {Path.cwd()}): "
            "point TCM_STORE_URL at the service's store[/red]"
        )
        raise typer.Exit(1)
    store = _open_store(settings)
    try:
        if not store.list_tenants():
            raise ValueError(
                f"the store at {url} holds no tenants: is TCM_STORE_URL "
                "(and TCM_REDIS_KEY_PREFIX) the service's store?"
            )
        summary = export_dataset(store, out, tenants=tenant, min_images_per_subject=min_images)
    except (ValueError, StoreUnavailableError) as exc:
        console.print(f"[red]{getattr(exc, 'message', exc)}[/red]")
        raise typer.Exit(1) from exc
    finally:
        store.close()
    left = sum(len(v) for v in summary["items_without_image"].values())
    console.print(
        f"exported {summary['num_images']} images of {summary['num_classes']} "
        f"subjects from {len(summary['tenants'])} tenants, "
        f"{summary['feedback_records']} feedback records to {out}"
        + (f"; {left} items without a stored image left out" if left else "")
    )
    console.print(
        f"retrain the served model: {summary['retrain_with']}",
        markup=False,
        soft_wrap=True,  # one line, to copy whole
    )


@app.command("import")
def import_cmd(
    source: Annotated[
        Path,
        typer.Argument(
            help=".npy matrix, .jsonl file or .parquet file (Parquet needs the 'parquet' extra)"
        ),
    ],
    url: Annotated[str, typer.Option("--url", envvar="TCM_URL", help="the service")] = (
        "http://127.0.0.1:8000"
    ),
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="TCM_API_KEY",
            help="the tenant's API key (better: TCM_API_KEY)",
            show_default=False,
        ),
    ] = None,
    subjects: Annotated[
        Path | None, typer.Option(help=".npy: text file, one subject per row")
    ] = None,
    ids: Annotated[
        Path | None,
        typer.Option(help=".npy: text file, one item id per row (default: <id-prefix><row>)"),
    ] = None,
    id_prefix: Annotated[
        str | None,
        typer.Option(
            help="prefix of derived item ids (default: the file's stem, '-', the first 8 hex "
            "digits of the sha256 of its content and '-')"
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="items per request")] = 1000,
    concurrency: Annotated[int, typer.Option(min=1, help="requests in flight")] = 2,
    state: Annotated[
        Path | None, typer.Option(help="progress file (default: <source>.import.json)")
    ] = None,
    restart: Annotated[
        bool,
        typer.Option(
            help="ignore a saved progress file: import from the first row, as a fresh run (a "
            "stored item id is then an error)"
        ),
    ] = False,
    retries: Annotated[int, typer.Option(min=0, help="per batch, on 429/503/network")] = 8,
) -> None:
    """Streams embeddings into a tenant's gallery in all-or-nothing batches; run it again
    after an interruption and it resumes where it stopped, without duplicates. The progress
    file is kept for this file's content and these options only: with another file, another
    --subjects/--ids/--id-prefix or another service or key, it is not resumed."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from service.ops.importer import ImportError_, count_rows, run_import

    if not api_key:
        console.print("[red]set TCM_API_KEY (or --api-key) to the tenant's API key[/red]")
        raise typer.Exit(2)
    try:
        total = count_rows(source) if source.exists() else 0
        columns = (
            TextColumn("[bold]import[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} items/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("import", total=total, rate="-")
            started, moved = time.monotonic(), 0

            def advance(n: int) -> None:
                nonlocal moved
                moved += n
                rate = moved / max(time.monotonic() - started, 1e-9)
                bar.update(task, advance=n, rate=f"{rate:,.0f}")

            counts = run_import(
                source=source,
                url=url,
                api_key=api_key,
                subjects=subjects,
                ids=ids,
                id_prefix=id_prefix,
                batch_size=batch_size,
                concurrency=concurrency,
                state_path=state,
                restart=restart,
                retries=retries,
                progress=advance,
            )
    except ImportError_ as exc:  # one line, no traceback: a bad file, state or answer
        console.print(
            f"import stopped: {' '.join(str(exc).split())}",
            style="red",
            markup=False,
            highlight=False,
        )
        if exc.resumable:
            console.print("run the same command again to resume after the last stored batch")
        raise typer.Exit(1) from exc
    except KeyboardInterrupt as exc:
        console.print(
            "import interrupted: run the same command again to resume after the last stored batch",
            style="red",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(130) from exc
    console.print(
        f"{counts['total']} rows: {counts['stored']} stored now, "
        f"{counts['skipped']} stored by an earlier run, {counts['already']} found "
        "already stored (resent after an interruption)"
    )


# --- the model registry over HTTP -------------------------------------------------------------
UrlOpt = Annotated[str, typer.Option("--url", envvar="TCM_URL", help="the service")]


@contextmanager
def _admin(url: str, token: str | None = None) -> Iterator[Client]:
    """A ``tcm_client.Client`` with the admin token (``token``, else ``TCM_ADMIN_TOKEN``); an
    error answer or an unreachable service inside the block is one red line and exit code 1
    (no token: exit code 2). Answers are printed as the service sent them (``route.raw()``:
    its JSON, its key order)."""
    from tcm_client import ApiError, Client, TransportFailure

    token = token or os.environ.get("TCM_ADMIN_TOKEN")
    if not token:
        console.print(
            "[red]set TCM_ADMIN_TOKEN (or --admin-token) to the service's admin token[/red]"
        )
        raise typer.Exit(2)
    try:
        with Client(url, token, timeout_s=30.0) as tcm:
            yield tcm
    except TransportFailure as exc:
        console.print(f"[red]cannot reach {url}: {exc.__cause__}[/red]")
        raise typer.Exit(1) from exc
    except ApiError as exc:
        r = exc.response
        assert r is not None
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        console.print(
            f"[red]{r.status_code} {body.get('code', '')}: {body.get('message', r.text)}[/red]"
        )
        raise typer.Exit(1) from exc


def _print(body: Any) -> None:
    typer.echo(json.dumps(body, indent=2))


def _progress_line(prog: dict[str, Any]) -> str:
    line = f"{prog.get('version')}: {prog.get('state')}"
    if prog.get("items_total"):
        line += (
            f", {prog.get('items_embedded', 0)}/{prog['items_total']} items re-embedded, "
            f"{prog.get('tenants_done', 0)}/{prog.get('tenants_total', 0)} tenants"
        )
    return line


def _wait(tcm: Client, version: str, timeout_s: float) -> None:
    """Polls the registry until ``version`` serves, printing the activation's progress as it
    changes (on stderr; the JSON answers stay on stdout)."""
    deadline = time.monotonic() + timeout_s
    shown = ""
    while time.monotonic() < deadline:
        body = tcm.list_models.raw()
        prog = body.get("progress") or {}
        if prog.get("version") == version:
            line = _progress_line(prog)
            if line != shown:
                console.print(line, markup=False, highlight=False)
                shown = line
        if prog.get("version") == version and prog.get("state") == "failed":
            console.print(f"[red]activation failed: {prog.get('error')}[/red]")
            raise typer.Exit(1)
        if body["active"] == version and body["served"] == version:
            console.print(
                f"{version} is active ({prog.get('items_embedded', 0)} items "
                f"re-embedded, {prog.get('items_skipped', 0)} left out)"
            )
            return
        time.sleep(0.5)
    console.print(f"[red]{version} not active after {timeout_s:.0f}s[/red]")
    raise typer.Exit(1)


@models_app.command("list")
def models_list(url: UrlOpt = "http://127.0.0.1:8000") -> None:
    """Registered versions, the active one, the activation in progress, the history."""
    with _admin(url) as tcm:
        _print(tcm.list_models.raw())


@models_app.command("stage")
def models_stage(
    path: Annotated[str, typer.Argument(help="artefact folder (on the server)")],
    url: UrlOpt = "http://127.0.0.1:8000",
) -> None:
    """Registers an exported artefact so that it can be activated; prints its version."""
    with _admin(url) as tcm:
        body = tcm.stage_model.raw(path)
    _print(body)
    console.print(
        f"staged {body['model_version']}; activate it with: tcm-serve models "
        f"activate {body['model_version']}",
        markup=False,
        highlight=False,
    )


@models_app.command("activate")
def models_activate(
    version: str,
    url: UrlOpt = "http://127.0.0.1:8000",
    wait: Annotated[bool, typer.Option(help="until switched")] = True,
    timeout_s: float = 3600.0,
) -> None:
    """Switches to a registered version without downtime (re-embeds the galleries first)."""
    with _admin(url) as tcm:
        _print(tcm.activate_model.raw(version))
        if wait:
            _wait(tcm, version, timeout_s)


@models_app.command("rollback")
def models_rollback(
    url: UrlOpt = "http://127.0.0.1:8000",
    wait: Annotated[bool, typer.Option(help="until switched")] = True,
    timeout_s: float = 3600.0,
) -> None:
    """Switches back to the version active before the current one."""
    with _admin(url) as tcm:
        body = tcm.rollback_model.raw()
        _print(body)
        if wait:
            _wait(tcm, body["version"], timeout_s)


# --- tenants and API keys over HTTP -----------------------------------------------------------
AdminTokenOpt = Annotated[
    str | None,
    typer.Option(
        "--admin-token",
        envvar="TCM_ADMIN_TOKEN",
        help="the service's admin token (better: TCM_ADMIN_TOKEN)",
        show_default=False,
    ),
]
TenantArg = Annotated[str, typer.Argument(help="the tenant's id, or its name")]


def _tenant_id(tcm: Client, tenant: str) -> str:
    """``tenant`` as a tenant id: itself when a tenant has that id, else the id of the tenant
    of that name (names are unique, compared as the service compares them); exit code 1 when
    neither exists."""
    from service.store.base import tenant_name_key

    tenants = tcm.list_tenants()
    if any(t.tenant_id == tenant for t in tenants):
        return tenant
    named = [t.tenant_id for t in tenants if tenant_name_key(t.name) == tenant_name_key(tenant)]
    if len(named) == 1:
        return named[0]
    if named:  # only a store from before names were unique can hold two
        console.print(
            f"[red]{len(named)} tenants are named {tenant!r} ({', '.join(named)}): give the "
            "tenant id[/red]",
            highlight=False,
        )
        raise typer.Exit(1)
    console.print(f"[red]no tenant has the id or name {tenant!r}[/red]", highlight=False)
    raise typer.Exit(1)


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="unique among tenants (case and spaces aside)")],
    url: UrlOpt = "http://127.0.0.1:8000",
    admin_token: AdminTokenOpt = None,
) -> None:
    """Creates a tenant with its first API key; prints the answer, the key with it (shown once:
    the service keeps only its hash)."""
    with _admin(url, admin_token) as tcm:
        body = tcm.create_tenant.raw(name)
    _print(body)
    console.print(
        f"created tenant {body['tenant_id']} ({body['name']}); its API key is shown once: "
        "store it now",
        markup=False,
        highlight=False,
    )


@tenants_app.command("list")
def tenants_list(url: UrlOpt = "http://127.0.0.1:8000", admin_token: AdminTokenOpt = None) -> None:
    """Every tenant: id, name, creation time (oldest first)."""
    with _admin(url, admin_token) as tcm:
        _print(tcm.list_tenants.raw())


@tenants_app.command("keys")
def tenants_keys(
    tenant: TenantArg, url: UrlOpt = "http://127.0.0.1:8000", admin_token: AdminTokenOpt = None
) -> None:
    """The tenant's API keys: ids, creation and revocation times (never the secrets)."""
    with _admin(url, admin_token) as tcm:
        _print(tcm.list_keys.raw(_tenant_id(tcm, tenant)))


@tenants_app.command("issue-key")
def tenants_issue_key(
    tenant: TenantArg,
    revoke_existing: Annotated[
        bool, typer.Option(help="revoke the tenant's other keys in the same step (a leaked key)")
    ] = False,
    url: UrlOpt = "http://127.0.0.1:8000",
    admin_token: AdminTokenOpt = None,
) -> None:
    """Issues a new API key; the others stay valid unless --revoke-existing (rotate without
    downtime: issue, deploy the new key, then revoke-key the old one)."""
    with _admin(url, admin_token) as tcm:
        body = tcm.issue_key.raw(_tenant_id(tcm, tenant), revoke_existing=revoke_existing)
    _print(body)
    revoked = body.get("revoked_key_ids") or []
    console.print(
        f"issued key {body['key_id']} (shown once)"
        + (f"; revoked {', '.join(revoked)}" if revoked else ""),
        markup=False,
        highlight=False,
    )


@tenants_app.command("revoke-key")
def tenants_revoke_key(
    tenant: TenantArg,
    key_id: Annotated[str, typer.Argument(help="the key's id (tcm-serve tenants keys TENANT)")],
    url: UrlOpt = "http://127.0.0.1:8000",
    admin_token: AdminTokenOpt = None,
) -> None:
    """Revokes one API key at once (idempotent); the tenant's other keys stay valid."""
    with _admin(url, admin_token) as tcm:
        tenant_id = _tenant_id(tcm, tenant)
        tcm.revoke_key(tenant_id, key_id)
    console.print(f"revoked key {key_id} of tenant {tenant_id}", markup=False, highlight=False)


if __name__ == "__main__":  # pragma: no cover
    app()
