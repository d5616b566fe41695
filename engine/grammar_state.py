"""The grammar state of each request with structured output, and the masks it puts on the logits.

Life of a request's state: `Grammars.start` builds it when the engine takes the request, on every worker that holds
it, and feeds it the output the request already has (the first token on a decode worker, sampled by the prefill
worker; a resumed request's tokens after a migration). So the state itself never travels: the spec and the tokens
do, and rebuilding from them puts each worker exactly where the last one stopped. Each step the sampler asks
`allowed_tokens` for the rows that have a state (one call, masks computed in parallel by llguidance's executor);
each token the engine appends goes through `GrammarState.accept`; when the grammar can take nothing more
(`GrammarState.complete`) the request stops, as at EOS.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

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

    def start(self, structured: StructuredOutput, tokens: Sequence[int] = ()) -> GrammarState:
        """A state at the start of the output, advanced by `tokens`. Raises ValueError if they do not follow it."""
        from llguidance import LLMatcher

        state = GrammarState(LLMatcher(self._llg_tokenizer(), structured.grammar(), log_level=0))
        if state.matcher.is_error():
            raise ValueError(f"{structured.field}: {state.error}")
        if tokens and not state.matcher.consume_tokens(list(tokens)):
            raise ValueError(f"{structured.field}: the output so far does not follow it ({state.error})")
        return state

    def allowed_tokens(self, states: Sequence[GrammarState], device: torch.device) -> torch.Tensor:
        """[R, V] bool: which tokens each state allows next."""
        from llguidance.torch import fill_next_token_bitmask_par

        words = (self.vocab_size + 31) // 32
        bitmask = torch.zeros((len(states), words), dtype=torch.int32)  # [R, W], bit b of word w is token 32w + b
        fill_next_token_bitmask_par(self._llg_executor(), [(s.matcher, i) for i, s in enumerate(states)], bitmask)
        bitmask = bitmask.to(device, non_blocking=True)
        bits = (bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32, device=device)) & 1  # [R, W, 32]
        return bits.reshape(len(states), words * 32)[:, :self.vocab_size].bool()

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


def mask_rows(logits: torch.Tensor, raw: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits: [R, V] adjusted, raw: [R, V] before the adjustments, allowed: [R, V] -> [R, V] with forbidden tokens at
    -inf. A row the adjustments and the grammar together leave empty (`min_tokens` hides EOS where the grammar wants
    only EOS) follows the grammar alone: the grammar wins."""
    masked = logits.masked_fill(~allowed, float("-inf"))
    empty = ~torch.isfinite(masked).any(dim=-1)  # [R]
    if bool(empty.any()):
        masked[empty] = raw[empty].masked_fill(~allowed[empty], float("-inf"))
    return masked
