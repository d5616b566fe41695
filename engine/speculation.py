"""What a decoding request speculates with in a step, for each method of `engine.speculative` (the scheduler asks).

    prompt_lookup  the tokens that followed the latest earlier occurrence of its last tokens (`engine.prompt_lookup`)
    draft          how many tokens the draft model is to propose in the runner (`engine.draft`)
    lookahead      its window of guesses and the n-grams to verify (`engine.lookahead`), started on first use

The chunk's tokens are then the request's last token followed by `tokens`, and the step needs KV slots for
`reserved` tokens after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.config import SpeculativeSettings
from pdserve.engine.lookahead import Layout, LookaheadState
from pdserve.engine.prompt_lookup import propose
from pdserve.engine.request import Request


@dataclass(frozen=True)
class Speculation:
    tokens: tuple[int, ...] = ()
    """Tokens after the request's last one in its chunk: prompt lookup's proposals, or lookahead's window and
    candidates."""
    proposed: tuple[int, ...] = ()
    """Of those, proposals checked in order against the model's picks (prompt lookup)."""
    draft_tokens: int = 0
    lookahead: Layout | None = None

    @property
    def reserved(self) -> int:
        """KV slots it needs after the request's last token."""
        return len(self.tokens) + self.draft_tokens


NONE = Speculation()


def plan(request: Request, settings: SpeculativeSettings, k: int, room: int) -> Speculation:
    """`k`: proposals allowed (0: none this step); `room`: tokens left in the step's budget after the last one."""
    if k <= 0:
        return NONE
    if settings.method == "draft":
        return Speculation(draft_tokens=k)
    if settings.method == "prompt_lookup":
        proposed = propose(request.all_token_ids, k)
        return Speculation(tokens=proposed, proposed=proposed)
    state = request.lookahead
    if state is None:
        state = request.lookahead = LookaheadState.start(request.all_token_ids, settings.lookahead_window,
                                                         settings.lookahead_ngram - 1)
    layout = state.layout(request.all_token_ids[-1], settings.lookahead_window)
    if max(layout.positions(request.num_tokens - 1)) >= len(request.prompt_token_ids) + request.sampling.max_tokens:
        return NONE  # its window would reach past the request's last position (and the context length)
    tokens = state.tokens(layout)
    return Speculation(tokens=tokens, lookahead=layout) if len(tokens) <= room else NONE
