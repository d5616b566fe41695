"""A request's input, its life inside the engine, and what the engine reports about it.

`Prompt` and `RequestOutput` are frozen and cross boundaries. `Request` is the engine's own mutable record: the
scheduler advances `num_computed_tokens` and owns `block_ids`; the engine appends sampled tokens.

Life: WAITING -> RUNNING (prefill in chunks, then one token per step) -> FINISHED. A preempted request goes back to
WAITING with its blocks freed and is recomputed from prompt + tokens so far. A prefill-only request stops at HELD
after its first token, keeping its blocks for a KV handoff; a request whose KV was filled elsewhere enters at HELD
(blocks reserved) and becomes RUNNING when committed.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:  # types only: a request's fields, made by the engine; reading a prompt does not load torch
    from pdserve.engine.grammar_state import GrammarState
    from pdserve.engine.logprobs import TokenLogprobs
    from pdserve.engine.lookahead import LookaheadState


class PromptError(ValueError):
    """A prompt is malformed; the message names the field."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


ROLES = ("system", "user", "assistant", "tool")
"""The usual roles. Any other role that is a plain name (`ROLE_PATTERN`: `ipython`, `function`, `observation`, ...)
is passed to the model's chat template too, as vLLM does; the template decides (one that refuses it makes the
prompt invalid). A name keeps special-token text (`<|im_start|>`) and line breaks out of the rendered prompt."""
ROLE_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class Prompt:
    """Exactly one of text, chat messages or token ids."""

    text: str | None = None
    messages: tuple[Message, ...] | None = None
    token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("text", "messages", "token_ids") if getattr(self, name) is not None]
        if len(given) != 1:
            raise PromptError(f"prompt: give exactly one of text, messages or token_ids (got {given or 'none'})")
        if self.text is not None and not self.text:
            raise PromptError("prompt.text: must not be empty")
        if self.messages is not None:
            if not self.messages:
                raise PromptError("prompt.messages: must not be empty")
            for i, message in enumerate(self.messages):
                if not ROLE_PATTERN.fullmatch(message.role):
                    raise PromptError(f"prompt.messages[{i}].role: {message.role!r} is not a role name (one of "
                                      f"{ROLES}, or another name of letters, digits, _ and -, up to 64)")
        if self.token_ids is not None and not self.token_ids:
            raise PromptError("prompt.token_ids: must not be empty")

    @staticmethod
    def from_json(line: dict) -> "Prompt":
        """From an input line: {"prompt": str} | {"messages": [{"role", "content"}]} | {"token_ids": [int]}."""
        given = [key for key in ("prompt", "messages", "token_ids") if key in line]
        if len(given) != 1:
            raise PromptError(f"input line: needs exactly one of 'prompt', 'messages' or 'token_ids' (got {given})")
        if "messages" in line:
            messages = line["messages"]
            if not isinstance(messages, list):
                raise PromptError("messages: must be a list of {role, content}")
            return Prompt(messages=tuple(_message(i, m) for i, m in enumerate(messages)))
        if "token_ids" in line:
            ids = line["token_ids"]
            if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
                raise PromptError("token_ids: must be a list of integers")
            return Prompt(token_ids=tuple(ids))
        if not isinstance(line["prompt"], str):
            raise PromptError("prompt: must be a string")
        return Prompt(text=line["prompt"])


def _message(index: int, value: object) -> Message:
    if not isinstance(value, dict) or not isinstance(value.get("role"), str) or not isinstance(
            value.get("content"), str):
        raise PromptError(f"messages[{index}]: must be {{'role': str, 'content': str}}")
    return Message(role=value["role"], content=value["content"])


ONLINE_PRIORITY = 0
"""A request's priority unless it says otherwise. Lower values are served first (as vLLM's `priority`)."""
BATCH_PRIORITY = 10
"""Requests of the Batch API: served after online ones, preempted first."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    HELD = "held"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"
    """EOS, a stop token id or a stop string."""
    LENGTH = "length"
    """max_tokens or the model's context reached."""
    ABORT = "abort"
    """Cancelled by the caller."""
    PREFILLED = "prefilled"
    """Prefill-only request: first token sampled, KV held for the handoff."""


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    """A tuple, so each step's output shares it instead of copying it."""
    sampling: SamplingParams
    arrival_order: int
    prefill_only: bool = False
    priority: int = ONLINE_PRIORITY
    """Lower is served first and preempted last (`engine.scheduler`)."""
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache instead of being computed (or received)."""
    block_hashes: list[int] = field(default_factory=list)
    """Hashes of the request's full blocks as far as they were needed (`engine.prefix_hash`)."""
    num_registered_blocks: int = 0
    """Leading blocks registered in the prefix cache (or taken from it)."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """Per prompt position, when asked for (`SamplingParams.prompt_logprobs`): filled as its chunks are computed."""
    resumed_tokens: int = 0
    """A request resumed after a worker failed: its prompt ends with this many tokens of output the client already
    has. They count as output for seeded sampling's positions and for the text (see `Engine.add_request`)."""
    speculative: bool = False
    """Its decode steps check proposed tokens (`engine.prompt_lookup`): greedy, no logit changes, logprobs or
    grammar, and the engine speculates."""
    speculation_misses: int = 0
    """Speculative steps in a row whose proposals were all rejected."""
    speculation_pause: int = 0
    """Decode steps to go before it proposes again (`prompt_lookup.pause_after`)."""
    lookahead: LookaheadState | None = None
    """Lookahead decoding's window and n-gram pool (`engine.lookahead`), once it speculates that way."""
    grammar: GrammarState | None = None
    """Where the output is in its structured-output grammar (`SamplingParams.structured_output`), else None."""

    @property
    def order(self) -> tuple[int, int]:
        """Service order: by priority, then by arrival (smallest first)."""
        return self.priority, self.arrival_order

    @property
    def all_token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """One token left to compute and it is a sampled one (not part of a prefill)."""
        out = self.output_token_ids
        return bool(out) and len(self.prompt_token_ids) + len(out) - self.num_computed_tokens == 1

    def token_slice(self, start: int, count: int) -> tuple[int, ...]:
        prompt_len = len(self.prompt_token_ids)
        if start >= prompt_len:
            return tuple(self.output_token_ids[start - prompt_len:start - prompt_len + count])
        return tuple(self.all_token_ids[start:start + count])


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one step did for one request (or the final state, from `Engine.generate`)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    """All output tokens so far."""
    new_token_ids: tuple[int, ...]
    text: str
    """All output text so far (stop strings and special tokens removed)."""
    text_delta: str
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the request, if any."""
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""
    logprobs: tuple[TokenLogprobs, ...] = ()
    """The new tokens' logprobs, when the request asked for them (`SamplingParams.logprobs`)."""
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    """On the first output of a request that asked (`SamplingParams.prompt_logprobs`): one per prompt token, the
    first None (nothing comes before it)."""
    speculative_proposed: int = 0
    speculative_accepted: int = 0
    """On the first output of a speculative step: the tokens proposed, and of those the ones accepted."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
