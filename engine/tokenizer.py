"""The model's tokenizer and chat template, from transformers.

For a GGUF file, transformers builds the tokenizer from the file's own vocabulary, merges and chat template; that
happens once, when engine.gguf_cache converts the file, and later loads read the saved copy.

Loading names the class `tokenizer_config.json` gives straight from transformers rather than through AutoTokenizer,
whose import pulls in torch (via the model-config classes): the router, which only tokenizes, starts without torch,
about 1.5 s sooner on this machine and ~190 MB smaller.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

from pdserve.engine.gguf_cache import converted
from pdserve.engine.model_source import ModelSource, SourceKind
from pdserve.engine.request import Message, Prompt, PromptError

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class Tokenizer:
    """Text <-> token ids, and chat messages -> token ids with the generation prompt added."""

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        """Tokenize with the tokenizer's defaults (special tokens as the model expects)."""
        return list(self.hf.encode(text))

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        from jinja2 import TemplateError

        if self.hf.chat_template is None:
            raise PromptError("prompt.messages: this model's tokenizer has no chat template; send a text prompt")
        try:
            text = self.hf.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                               add_generation_prompt=True, tokenize=False)
        except TemplateError as e:  # the template refuses this conversation (e.g. the order of roles)
            raise PromptError(f"prompt.messages: the model's chat template refused them: {e}") from e
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=True)


def load_tokenizer(source: ModelSource) -> Tokenizer | None:
    """The source's tokenizer, or None for random weights (token-id prompts only)."""
    if source.kind is SourceKind.RANDOM:
        return None
    folder = converted(str(source.path)) if source.kind is SourceKind.GGUF else str(source.path)
    if not any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
        log.warning("%s has no tokenizer; prompts must be token ids", folder)
        return None
    return Tokenizer(tokenizer_class(folder).from_pretrained(folder))


def tokenizer_class(folder: str) -> type:
    """The transformers class `tokenizer_config.json` names (the one AutoTokenizer picks), or AutoTokenizer itself
    when the file names none that transformers has."""
    import transformers

    path = os.path.join(folder, "tokenizer_config.json")
    name = None
    if os.path.isfile(path):
        with open(path) as f:
            name = json.load(f).get("tokenizer_class")
    found = getattr(transformers, name, None) if isinstance(name, str) else None
    return found if isinstance(found, type) else transformers.AutoTokenizer


def tokenize_prompt(prompt: Prompt, tokenizer: Tokenizer | None, vocab_size: int) -> list[int]:
    """A prompt's token ids: text and messages through the tokenizer, token ids checked against the vocabulary."""
    if prompt.token_ids is not None:
        bad = [t for t in prompt.token_ids if not 0 <= t < vocab_size]
        if bad:
            raise PromptError(f"prompt.token_ids: {bad[:5]} outside the vocabulary [0, {vocab_size})")
        return list(prompt.token_ids)
    if tokenizer is None:
        raise PromptError("prompt: this model has no tokenizer (random weights); send token_ids")
    ids = tokenizer.encode_chat(prompt.messages) if prompt.messages is not None else tokenizer.encode(str(prompt.text))
    if not ids:
        raise PromptError("prompt.text: tokenizes to no tokens")
    return ids
