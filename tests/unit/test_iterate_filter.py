"""The verify-and-keep-shortest filter on hand-made chains, graded by ovlt.rewards.math_reward."""
from __future__ import annotations

from ovlt.iterate.filter import (cut_at_marker, final_answer, select_chain, split_chain,
                                 stated_answer)
from ovlt.rewards import math_reward


def verify(resp, gt):
    return math_reward(resp, gt) >= 1.0


def test_final_and_stated_answers():
    assert final_answer("x <answer>3</answer> y <answer>5</answer>") == "5"
    assert final_answer("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert final_answer("no answer here") is None
    assert stated_answer("the sum is 3 + 4 = 7") == "7"
    # an explicit "answer is" phrase wins over a later stray number
    assert stated_answer("So the answer is 12. Then 5") == "12"
    assert stated_answer("we get \\boxed{9} and then 4") == "9"


def test_split_chain_layouts():
    assert split_chain("<think>\nA\n</think>\n<answer>4</answer>") == ("A", "4")
    # QwQ style: reasoning, </think>, then a boxed answer
    assert split_chain("A is 2.\nB is 2.\n</think>\nThe answer is \\boxed{4}.") == \
        ("A is 2.\nB is 2.", "4")
    assert split_chain("just \\boxed{4}") == ("just \\boxed{4}", "4")


def test_cut_at_first_wait_after_correct_answer():
    r = ("Bar A is 3 and bar B is 4, so the total is 3 + 4 = 7.\n"
         "Wait, let me re-check bar B. It is 4. So 7.\nWait, again: 7.")
    cut, was = cut_at_marker(r, "7", verify)
    assert was and cut == "Bar A is 3 and bar B is 4, so the total is 3 + 4 = 7."
    # A "Wait," before the correct answer was stated is a real correction: not cut there.
    r2 = "The total is 3 + 5 = 8.\nWait, bar B is 4, not 5. So 3 + 4 = 7.\nWait, fine."
    cut2, was2 = cut_at_marker(r2, "7", verify)
    assert was2 and cut2 == "The total is 3 + 5 = 8.\nWait, bar B is 4, not 5. So 3 + 4 = 7."
    # No correct answer before any marker: unchanged.
    r3 = "Hmm. Wait, the bars are 3 and 4."
    assert cut_at_marker(r3, "7", verify) == (r3, False)
    # Another marker is configurable.
    cut4, was4 = cut_at_marker("It is 7. Hmm, maybe 8?", "7", verify, marker="Hmm,")
    assert was4 and cut4 == "It is 7."


def test_select_shortest_verified_with_cut():
    long_ok = ("<think>\nBar A is 3, bar B is 4. Sum 3 + 4 = 7.\nWait, let me double-check "
               "everything carefully again: A is 3, B is 4, 7.\n</think>\n<answer>7</answer>")
    short_wrong = "<think>\nSum is 8.\n</think>\n<answer>8</answer>"
    medium_ok = ("<think>\nLooking at the chart, bar A has height 3 and bar B has height 4, "
                 "therefore adding them gives 7.\n</think>\n<answer>7</answer>")
    qwq_ok = "A=3, B=4, total 7.</think>\nThe answer is \\boxed{7}"
    no_answer = "<think>\nI am not sure.\n</think>"
    res = select_chain([long_ok, short_wrong, medium_ok, no_answer], "7", verify)
    assert res.n_candidates == 4 and res.n_verified == 2
    # long_ok cut at "Wait," is shorter than medium_ok
    assert res.index == 0 and res.was_cut
    assert res.chain == ("<think>\nBar A is 3, bar B is 4. Sum 3 + 4 = 7.\n</think>\n"
                         "<answer>7</answer>")
    assert math_reward(res.chain, "7") == 1.0
    # Without cutting, the medium chain is the shortest verified one.
    res2 = select_chain([long_ok, short_wrong, medium_ok], "7", verify, cut_at_wait=False)
    assert res2.index == 2 and not res2.was_cut
    # QwQ layout is normalised to think/answer tags.
    res3 = select_chain([qwq_ok], "7", verify)
    assert res3.chain == "<think>\nA=3, B=4, total 7.\n</think>\n<answer>7</answer>"
    # Nothing verified: nothing kept.
    res4 = select_chain([short_wrong, no_answer, ""], "7", verify)
    assert res4.chain is None and res4.n_verified == 0
    # Ties go to the earliest candidate.
    a = "<think>\nx = 7\n</think>\n<answer>7</answer>"
    b = "<think>\ny = 7\n</think>\n<answer>7</answer>"
    assert select_chain([a, b], "7", verify).index == 0


def test_min_verified_drops_a_once_right_guess():
    """A pass-rate filter: with min_verified=2 a problem whose answer verified in only one of its
    candidates keeps nothing (the lucky guess behind a wrong chain), one verified twice keeps its
    shortest chain, and n_verified is reported either way."""
    lucky = "<think>\ngreen 2 + green 4 = 5\n</think>\n<answer>5</answer>"
    wrong = "<think>\nred 1 + blue 2 = 3\n</think>\n<answer>3</answer>"
    right_long = "<think>\nred 1 + yellow 4 = 5, both stripes read.\n</think>\n<answer>5</answer>"
    once = select_chain([lucky, wrong, wrong], "5", verify, min_verified=2)
    assert once.chain is None and once.n_verified == 1 and once.index == -1
    twice = select_chain([right_long, wrong, lucky], "5", verify, min_verified=2)
    assert twice.n_verified == 2 and twice.index == 2 and twice.chain == lucky
    assert select_chain([lucky, wrong], "5", verify).chain == lucky  # the recipe's default: 1
