"""Request migration: a request whose worker fails goes on elsewhere, and its client's stream never notices.

As Dynamo does, the router replays the request on other workers with the tokens already sent appended to the
prompt: the new prefill recomputes their KV, and its first token is the next one the client gets. Greedy output is
the same as without the failure (the model sees the same tokens). A continuation runs under its own key
(`attempt.request_key`), so a late event from the failed attempt can never reach the new one. A request resumed at
another router (its client reconnected with the tokens it has) that no worker holds any more goes on the same way.

The continuation says how many of its prompt's tokens are the client's output (`resumed_tokens`), and the workers
go on from them as if uninterrupted (`Engine.add_request`): their detokenizer replays those tokens first, so the text
the failed worker was still holding back (an incomplete UTF-8 character, a possible stop string's start) comes
next, and a stop string split across the failure point still stops the output; seeded sampling draws from (seed,
output position) with positions counted from the start of the output. So resumed output equals uninterrupted output
in token ids and in text, greedy or seeded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pdserve.router.request_builder import ValidRequest

MAX_MIGRATIONS = 3
"""How many times one request may be resumed elsewhere before its client gets UNAVAILABLE."""


def continuation(request: ValidRequest, sent: Sequence[int]) -> ValidRequest | None:
    """The request to run after the client got `sent` tokens (none: the request itself); None when no token is left
    to generate."""
    if not sent:
        return request
    remaining = request.sampling.max_tokens - len(sent)
    if remaining <= 0:
        return None
    sampling = dataclasses.replace(request.sampling, max_tokens=remaining,
                                   prompt_logprobs=None)  # the client had them with its first token
    return dataclasses.replace(request, token_ids=request.token_ids + tuple(sent), sampling=sampling, resume=None,
                               resumed_tokens=len(sent))
