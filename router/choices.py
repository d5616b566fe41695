"""One OpenAI request's choices (prompts x n) run side by side on the cluster, as one stream of pieces.

    async for item in merged(orchestrator, requests):   # item.index: the choice; item.piece: its next piece
        ...

Each choice is its own request on the orchestrator. The first error of any choice ends the stream (raised to the
reader); leaving the loop early, or an error, cancels the choices still running, which aborts them on their workers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pdserve.router.orchestrator import Orchestrator, Piece
from pdserve.router.request_builder import ValidRequest


@dataclass(frozen=True)
class ChoicePiece:
    index: int
    piece: Piece


@dataclass(frozen=True)
class _Done:
    index: int


@dataclass(frozen=True)
class _Failed:
    error: Exception


async def merged(orchestrator: Orchestrator, requests: list[ValidRequest]) -> AsyncIterator[ChoicePiece]:
    queue: asyncio.Queue[ChoicePiece | _Done | _Failed] = asyncio.Queue()

    async def run(index: int, request: ValidRequest) -> None:
        try:
            async for piece in orchestrator.generate(request):
                queue.put_nowait(ChoicePiece(index, piece))
        except Exception as e:  # handed to the reader, which raises it
            queue.put_nowait(_Failed(e))
        else:
            queue.put_nowait(_Done(index))

    tasks = [asyncio.create_task(run(i, r), name=f"choice-{r.request_id}") for i, r in enumerate(requests)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if isinstance(item, _Failed):
                raise item.error
            if isinstance(item, _Done):
                running -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
