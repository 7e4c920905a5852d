"""Each evaluation metric scores hand-computed examples exactly as its definition in lorafleet.evaluation.metrics
says; ROUGE-L equals the reference implementation (the rouge-score package) on every pair; a tenant's answer
pattern that does not compile is a clear error, and one that backtracks catastrophically is bounded (no hang)."""

from __future__ import annotations

import math
import random

import pytest

from lorafleet.evaluation import metrics
from lorafleet.evaluation.metrics import AnswerPattern, PatternError, Score, score

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="pip install rouge-score (the dev extra)")


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("Paris", "Paris", 1.0),
        ("  Paris\n", "Paris ", 1.0),
        ("paris", "Paris", 0.0),
        ("Paris.", "Paris", 0.0),
        ("", "", 1.0),
    ],
)
def test_exact_match_compares_stripped_text(answer: str, reference: str, expected: float) -> None:
    assert metrics.exact_match(answer, reference) == expected


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The  Cat, sat!", "cat sat"),
        ("An apple a day", "apple day"),
        ("theatre", "theatre"),  # articles only as whole words
        ("  A.B.C  ", "abc"),  # punctuation removed before articles: "a" of "A.B.C" is no longer a word
        ("Answer:\t42", "answer 42"),
        ("", ""),
    ],
)
def test_normalize_is_squad_normalisation(text: str, normalized: str) -> None:
    assert metrics.normalize(text) == normalized


def test_normalized_exact_match() -> None:
    assert metrics.normalized_exact_match("The answer is: Paris!", "answer is paris") == 1.0
    assert metrics.normalized_exact_match("Paris, France", "Paris") == 0.0


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("It is 4.", "4", 1.0),
        ("It is 42.", "4", 0.0),  # whole words: 4 is not in 42
        ("The capital is New York City", "new york", 1.0),
        ("york new", "New York", 0.0),
        ("anything", "the", 0.0),  # normalised reference empty: contained only in an empty answer
        ("a", "the", 1.0),
    ],
)
def test_contains_is_whole_word_containment_after_normalisation(answer: str, reference: str, expected: float) -> None:
    assert metrics.contains(answer, reference) == expected


def test_rouge_l_hand_computed() -> None:
    # 6 tokens each, LCS "the cat on the mat" = 5: P = R = 5/6, F = 5/6.
    assert metrics.rouge_l("the cat sat on the mat", "The cat is on the mat.") == pytest.approx(5 / 6)
    # answer 2 tokens, reference 4, LCS 2: P = 1, R = 0.5, F = 2/3.
    assert metrics.rouge_l("red fox", "the red quick fox") == pytest.approx(2 / 3)
    assert metrics.rouge_l("", "anything") == 0.0
    assert metrics.rouge_l("!!!", "...") == 0.0


REFERENCE_PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("Hello, World!", "hello world"),
    ("user_id=42; ok", "user id 42 ok"),
    ("café naïve résumé", "cafe naive resume"),  # rouge-score drops non a-z0-9 characters
    ("数字 123", "123"),
    ("", "x"),
    ("a a a b", "a b a b a"),
]


@pytest.mark.parametrize(("answer", "reference"), REFERENCE_PAIRS)
def test_rouge_l_equals_rouge_score(answer: str, reference: str) -> None:
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(reference, answer)["rougeL"].fmeasure
    assert metrics.rouge_l(answer, reference) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_equals_rouge_score_on_random_texts() -> None:
    rng = random.Random(17)
    words = ["a", "b", "c", "d", "the", "cat", "Dog", "1", "2", "x-y", "z.", ""]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for _ in range(300):
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(0, 15)))
        reference = " ".join(rng.choice(words) for _ in range(rng.randint(0, 15)))
        expected = scorer.score(reference, answer)["rougeL"].fmeasure
        assert metrics.rouge_l(answer, reference) == pytest.approx(expected, abs=1e-12), (answer, reference)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [('{"a": [1, 2]}', 1.0), (" 7 ", 1.0), ('"text"', 1.0), ("{a: 1}", 0.0), ("", 0.0), ("[" * 100_000, 0.0)],
)
def test_json_valid(answer: str, expected: float) -> None:
    assert metrics.json_valid(answer) == expected


def test_regex_accuracy_compares_the_last_matches() -> None:
    pattern = AnswerPattern(r"-?\d+(?:\.\d+)?")  # the default: the last number
    answers = ["so 3 + 4 = 7", "first 7, then 8", "7", "no number", "x"]
    references = ["7", "7", "the answer is 7", "7", "not a number"]
    # The last reference has no number: not scored. Of the other 4: 1, 0, 1, 0.
    assert score("regexAccuracy", answers, references, pattern) == Score(0.5, 4)


def test_regex_accuracy_uses_the_first_group() -> None:
    pattern = AnswerPattern(r"####\s*(\d+)")
    assert metrics.regex_match(pattern, "reasoning 12 ... #### 42", "#### 42") == 1.0
    assert metrics.regex_match(pattern, "#### 41", "steps 5\n#### 42") == 0.0


@pytest.mark.parametrize("bad", ["(", "[a-", "x{2,1}", "a" * (metrics.MAX_PATTERN + 1)])
def test_an_unusable_pattern_is_a_clear_error(bad: str) -> None:
    with pytest.raises(PatternError, match=r"evaluation\.answerPattern"):
        AnswerPattern(bad)


def test_catastrophic_backtracking_is_bounded() -> None:
    pattern = AnswerPattern(r"(x+x+)+y")
    hostile = "x" * 5000
    # Each search stops at REGEX_TIMEOUT; an answer that times out scores 0 ...
    assert metrics.regex_match(pattern, hostile, "xxy") == 0.0
    # ... and after MAX_REGEX_TIMEOUTS of them the metric is left unmeasured instead of taking minutes.
    answers = [hostile] * (metrics.MAX_REGEX_TIMEOUTS + 5)
    assert score("regexAccuracy", answers, ["xxy"] * len(answers), AnswerPattern(r"(x+x+)+y")) == Score(None, 0)


def test_scores_are_means_over_examples() -> None:
    answers = ["Paris", "paris", "Rome"]
    references = ["Paris", "Paris", "Madrid"]
    assert score("exactMatch", answers, references) == Score(1 / 3, 3)
    assert score("normalizedExactMatch", answers, references) == Score(2 / 3, 3)
    assert score("jsonValid", ["1", "x"], ["", ""]) == Score(0.5, 2)
    assert score("exactMatch", [], []) == Score(None, 0)
    with pytest.raises(ValueError, match="answers"):
        score("exactMatch", ["a"], [])


def test_perplexity_is_exp_of_the_loss() -> None:
    assert metrics.perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert metrics.perplexity(None) is None
    assert metrics.perplexity(1e6) is None  # overflow: unmeasured, not infinite
