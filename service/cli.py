"""``tcm-serve``: run the service with uvicorn.

Settings come from ``TCM_*`` environment variables (see :mod:`service.settings`). Without
``TCM_ADMIN_TOKEN`` a fresh admin token is generated and printed once: it is valid for this
process only, so set the variable for anything but a trial run.
"""

from __future__ import annotations

import logging
import secrets
from typing import Annotated

import typer
import uvicorn
from pydantic import SecretStr, ValidationError
from rich.console import Console

from service.app import create_app
from service.settings import Settings

app = typer.Typer(add_completion=False, help="Serve a threshold-consistent embedding model.")
console = Console(stderr=True)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn/python log level")] = "info",
) -> None:
    """Loads the artefact at TCM_ARTEFACT_PATH and serves the v1 API."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
    except ValidationError as exc:
        console.print(f"[red]invalid settings (TCM_* environment variables):[/red]\n{exc}")
        raise typer.Exit(2) from exc
    if settings.admin_token is None:
        token = secrets.token_urlsafe(32)
        settings = settings.model_copy(update={"admin_token": SecretStr(token)})
        console.print("[yellow]TCM_ADMIN_TOKEN is not set; admin token for this process "
                      "(shown once):[/yellow]")
        console.print(token, markup=False, highlight=False)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level.lower())


if __name__ == "__main__":  # pragma: no cover
    app()
