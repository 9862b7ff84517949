"""The shape every kvpipe resource shares: ``async with`` opens it, leaving closes it."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class AsyncResource:
    """Base of the resources: ``start`` opens, ``aclose`` closes (safe twice, also after a
    failed start), and ``async with`` does both, closing even when the start fails."""

    async def start(self) -> None:
        """Open connections and tasks; the default has nothing to open."""

    async def aclose(self) -> None:
        """Release everything; must be safe to call twice and after a failed start."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
