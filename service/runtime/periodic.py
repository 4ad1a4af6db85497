"""A duty a running service repeats in the background (retention, the shard groups' table
poll): its own task, an interval, and the one error policy: a store that cannot be reached skips
a round with a warning, any other failure is logged with its traceback, and the next round runs
anyway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from service.errors import StoreUnavailableError

log = logging.getLogger(__name__)


class Periodic:
    def __init__(
        self,
        name: str,
        interval_s: float,
        body: Callable[[], Awaitable[object]],
        *,
        first_at_once: bool = True,
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self.body = body
        self.first_at_once = first_at_once
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        if not self.first_at_once:
            await asyncio.sleep(self.interval_s)
        while True:
            try:
                await self.body()
            except asyncio.CancelledError:
                raise
            except StoreUnavailableError as exc:
                log.warning("%s skipped, the store is unavailable: %s", self.name, exc.message)
            except Exception:
                log.exception("%s failed; it runs again later", self.name)
            await asyncio.sleep(self.interval_s)
