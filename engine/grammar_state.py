"""The grammar state of each request with structured output, and the masks it puts on the logits.

Life of a request's state: `Grammars.start` builds it when the engine takes the request, on every worker that holds
it, and feeds it the output the request already has (the first token on a decode worker, sampled by the prefill
worker; a resumed request's tokens after a migration). So the state itself never travels: the spec and the tokens
do, and rebuilding from them puts each worker exactly where the last one stopped. Each step the model runner calls
`begin_masks` for the rows that have a state before the model's forward pass; the masks are computed on the grammar
thread meanwhile (rows in parallel, by llguidance's executor) and the sampler sets forbidden tokens to -inf. Each
token the engine appends goes through `GrammarState.accept`; when the grammar can take nothing more
(`GrammarState.complete`) the request stops, as at EOS.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from pdserve.engine.structured_output import StructuredOutput

log = logging.getLogger(__name__)


class GrammarState:
    """Where one request is in its grammar."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher  # llguidance.LLMatcher

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False (and the state is broken) if the grammar forbids it."""
        return self.matcher.consume_token(token_id)

    @property
    def complete(self) -> bool:
        """The grammar is matched and can take no further token."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class Grammars:
    """One engine's link to llguidance: the tokenizer it masks over (built once, ~0.3 s, on first use) and the
    executor that computes a step's masks in parallel."""

    def __init__(self, hf_tokenizer, vocab_size: int) -> None:
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._tokenizer = None
        self._executor = None
        self._thread: ThreadPoolExecutor | None = None

    def start(self, structured: StructuredOutput, tokens: Sequence[int] = ()) -> GrammarState:
        """A state at the start of the output, advanced by `tokens`. Raises ValueError if they do not follow it."""
        from llguidance import LLMatcher

        state = GrammarState(LLMatcher(self._llg_tokenizer(), structured.grammar(), log_level=0))
        if state.matcher.is_error():
            raise ValueError(f"{structured.field}: {state.error}")
        if tokens and not state.matcher.consume_tokens(list(tokens)):
            raise ValueError(f"{structured.field}: the output so far does not follow it ({state.error})")
        return state

    def begin_masks(self, states: Sequence[GrammarState]) -> PendingMasks:
        """Start computing which tokens each state allows next, on the grammar thread (llguidance drops the GIL): the
        runner calls this before the model's forward pass, so the two overlap."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")
        return PendingMasks(self._thread.submit(self._allowed, list(states)))

    def _allowed(self, states: list[GrammarState]) -> torch.Tensor:
        """[R, V] bool on the host."""
        from llguidance.torch import fill_next_token_bitmask_par

        bitmask = torch.zeros((len(states), (self.vocab_size + 31) // 32), dtype=torch.int32)
        fill_next_token_bitmask_par(self._llg_executor(), [(s.matcher, i) for i, s in enumerate(states)], bitmask)
        return unpack(bitmask, self.vocab_size)

    def _llg_tokenizer(self):
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size)
            log.info("structured output: llguidance tokenizer built (%s tokens)", self.vocab_size)
        return self._tokenizer

    def _llg_executor(self):
        if self._executor is None:
            from llguidance import LLExecutor

            self._executor = LLExecutor()
        return self._executor


class PendingMasks:
    """A step's grammar masks, being computed (`Grammars.begin_masks`)."""

    def __init__(self, allowed: Future) -> None:
        self._allowed = allowed

    def allowed(self, device: torch.device) -> torch.Tensor:
        """[R, V] bool (waits for the computation)."""
        return self._allowed.result().to(device, non_blocking=True)


def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bitmask: [R, W] int32, bit b of word w for token 32w + b -> [R, V] bool. The words are little-endian, so bit
    i of byte j is token 8j + i: one lookup per byte."""
    bits = _bits_of_bytes()[bitmask.view(torch.uint8).long()]  # [R, 4W, 8]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size]


@functools.cache
def _bits_of_bytes() -> torch.Tensor:
    """[256, 8] bool: row n holds the bits of n, lowest first."""
    return ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()


def mask_rows(logits: torch.Tensor, raw: torch.Tensor, allowed: torch.Tensor, adjusted: Sequence[int]) -> None:
    """logits: [R, V] after the adjustments, raw: [R, V] before them, allowed: [R, V]; `adjusted`: the rows whose
    adjustments may have masked tokens. Sets forbidden tokens to -inf in place. An adjusted row that the adjustments
    and the grammar together leave empty (`min_tokens` hides EOS where the grammar wants only EOS) follows the grammar
    alone: the grammar wins."""
    logits.masked_fill_(~allowed, float("-inf"))
    for row in adjusted:
        if not bool(torch.isfinite(logits[row]).any()):
            logits[row] = raw[row].masked_fill(~allowed[row], float("-inf"))
