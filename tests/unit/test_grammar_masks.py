"""The grammar masks' arithmetic (`engine.grammar_state`), without a model: llguidance's bitmask unpacked to one
flag per token, and forbidden tokens set to -inf with the grammar winning over the other logit changes."""

import torch

from pdserve.engine.grammar_state import mask_rows, unpack


def test_unpack_gives_token_32w_plus_b_from_bit_b_of_word_w():
    allowed = {0, 5, 31, 32, 33, 63, 64, 95, 99}
    vocab = 100
    bitmask = torch.zeros((2, 4), dtype=torch.int32)
    for token in allowed:
        word, bit = divmod(token, 32)
        bitmask[0, word] |= torch.tensor(1 << bit if bit < 31 else -(1 << 31), dtype=torch.int32)
    flags = unpack(bitmask, vocab)
    assert flags.shape == (2, vocab) and flags.dtype == torch.bool
    assert set(flags[0].nonzero()[:, 0].tolist()) == allowed and not flags[1].any()


def test_forbidden_tokens_go_to_minus_infinity_and_the_grammar_wins_an_empty_row():
    raw = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    adjusted = raw.clone()
    adjusted[1, 3] = float("-inf")  # min_tokens hid the stop token, the only one the grammar allows
    allowed = torch.tensor([[True, False, True, False], [False, False, False, True]])
    mask_rows(adjusted, raw, allowed, [1])
    assert adjusted[0].tolist() == [1.0, float("-inf"), 3.0, float("-inf")]
    assert adjusted[1].tolist() == [float("-inf")] * 3 + [4.0]
