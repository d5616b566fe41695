"""The controller's output-length model: mean output tokens per prompt-length class, learned from finished requests
and applied to the arrivals (so decode is sized for what is arriving, not for what finished)."""

import math

from pdserve.controller.output_lengths import (
    MIN_COVERAGE,
    NUM_CLASSES,
    UNSEEN,
    class_counts,
    class_means,
    expected_output,
    learn,
    prompt_class,
)


def test_classes_are_powers_of_two_and_the_last_one_holds_the_rest():
    assert [prompt_class(n) for n in (0, 1, 2, 3, 4, 255, 256, 4000)] == [0, 0, 1, 1, 2, 7, 8, 11]
    assert prompt_class(10**9) == NUM_CLASSES - 1
    assert class_counts([300, 400, 4000]) == tuple(2 if c == 8 else 1 if c == 11 else 0 for c in range(NUM_CLASSES))


def test_a_class_learns_its_mean_and_keeps_it_while_unseen():
    chat = class_means([(300, 250)] * 40 + [(400, 230)] * 40)  # class 8: mean 240
    learned = learn((), chat)
    assert learned[8] == 240 and learned[11] == UNSEEN
    summaries = class_means([(4000, 150)] * 30)
    for _ in range(20):  # minutes of summaries: the chat class is not forgotten
        learned = learn(learned, summaries)
    assert learned[8] == 240 and learned[11] == 150
    moved = learn(learned, class_means([(300, 340)] * 50))
    assert moved[8] == 240 + 50 / (50 + 50) * 100  # weighted by how many it saw


def test_expected_output_follows_the_arrivals_mix_at_once():
    learned = learn(learn((), class_means([(300, 250)] * 10)), class_means([(4000, 150)] * 10))
    assert expected_output(learned, class_counts([300] * 9 + [4000])) == (9 * 250 + 150) / 10
    assert expected_output(learned, class_counts([4000] * 5)) == 150
    unseen = class_counts([300] * 7 + [20] * 3)  # 30% of the arrivals in a class never seen
    assert 0.7 < MIN_COVERAGE and math.isnan(expected_output(learned, unseen))
    assert math.isnan(expected_output((), class_counts([300])))
    assert math.isnan(expected_output(learned, ()))
