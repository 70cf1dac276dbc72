"""Preference directions: samplers, the system-prompt encoding and its parser, bad input."""

import math
import random

import pytest

from pyalign.directions import (
    angle_of, direction_at, direction_system_prompt, evaluation_directions, parse_direction,
    preference_words, prompt_weights, sample_angle_directions, sample_sphere_directions, unit_direction, weighted_reward,
)

OBJECTIVES = ["helpfulness", "verbosity"]


def test_unit_direction_normalises_and_rejects_bad_vectors():
    assert unit_direction([3, -4]) == pytest.approx((0.6, -0.8))
    with pytest.raises(ValueError, match=r"v: expected 2 components \(one per objective\), got 3"):
        unit_direction([1, 0, 0], 2)
    with pytest.raises(ValueError, match="v: a direction needs a non-zero norm"):
        unit_direction([0.0, 0.0], 2)
    with pytest.raises(ValueError, match="v: components must be finite"):
        unit_direction([1.0, float("nan")])
    with pytest.raises(ValueError, match="v: expected a sequence of numbers"):
        unit_direction(["a", 1])
    with pytest.raises(ValueError, match="direction: expected 2"):
        unit_direction([1.0], 2, name="direction")


def test_angle_sampler_stays_in_range_and_is_uniform_and_seeded():
    directions = sample_angle_directions(4000, seed=1)
    angles = [angle_of(v) for v in directions]
    assert all(-math.pi / 4 - 1e-12 <= a <= 1e-12 for a in angles)
    assert all(abs(math.hypot(*v) - 1) < 1e-12 for v in directions)
    # uniform in angle: each quarter of the range holds ~1/4 of the samples
    quarters = [sum(-math.pi / 4 * (q + 1) / 4 <= a < -math.pi / 4 * q / 4 for a in angles) for q in range(4)]
    assert all(900 < n < 1100 for n in quarters), quarters
    assert sample_angle_directions(10, seed=1) == directions[:10]
    assert sample_angle_directions(10, seed=2) != directions[:10]
    custom = sample_angle_directions(50, angle_range=(0.1, 0.2), seed=0)
    assert all(0.1 <= angle_of(v) <= 0.2 for v in custom)
    with pytest.raises(ValueError, match="angle_range"):
        sample_angle_directions(3, angle_range=(0.2, 0.1))
    with pytest.raises(ValueError, match="count"):
        sample_angle_directions(-1)


def test_sphere_sampler_respects_signs_and_is_uniform_on_the_region():
    signs = ["+", "-", "0", "any"]
    directions = sample_sphere_directions(6000, signs, seed=3)
    for v in directions:
        assert len(v) == 4 and abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-12
        assert v[0] >= 0 and v[1] <= 0 and v[2] == 0
    # uniform on the sphere's region: by symmetry each free component has the same distribution,
    # E[v_i^2] = 1/3 over the three free components, and "any" is negative half the time
    for i in (0, 1, 3):
        assert sum(v[i] ** 2 for v in directions) / len(directions) == pytest.approx(1 / 3, abs=0.02)
    assert sum(v[3] < 0 for v in directions) / len(directions) == pytest.approx(0.5, abs=0.03)
    # in 2-D with ("+", "-") the angle is uniform on [-pi/2, 0]
    angles = [angle_of(v) for v in sample_sphere_directions(4000, ["+", "-"], seed=0)]
    assert sum(a > -math.pi / 4 for a in angles) / len(angles) == pytest.approx(0.5, abs=0.03)
    assert sample_sphere_directions(5, signs, seed=random.Random(7)) == sample_sphere_directions(5, signs, seed=7)
    with pytest.raises(ValueError, match=r"signs\[1\]: expected one of"):
        sample_sphere_directions(1, ["+", "positive"])
    with pytest.raises(ValueError, match="signs: at least one objective"):
        sample_sphere_directions(1, ["0", "0"])


def test_evaluation_directions_span_the_paper_range():
    directions = evaluation_directions()
    assert len(directions) == 10
    assert directions[0] == pytest.approx((1.0, 0.0))
    assert directions[-1] == pytest.approx((math.sqrt(2) / 2, -math.sqrt(2) / 2))
    steps = [angle_of(a) - angle_of(b) for a, b in zip(directions, directions[1:])]
    assert steps == pytest.approx([math.pi / 4 / 9] * 9)
    with pytest.raises(ValueError, match="count"):
        evaluation_directions(1)


def test_system_prompt_encoding_and_parser_round_trip():
    v = direction_at(-math.pi / 4)
    prompt = direction_system_prompt(v, OBJECTIVES)
    assert prompt == "maximize weighted rating = helpfulness*71 + verbosity*-71"
    assert direction_system_prompt((0.8, -0.6), OBJECTIVES, prefix="You are an assistant. ") == (
        "You are an assistant. maximize weighted rating = helpfulness*80 + verbosity*-60")
    assert prompt_weights((1, 0)) == [100, 0]
    assert parse_direction(prompt, OBJECTIVES) == pytest.approx(v)
    for v in sample_sphere_directions(200, ["any", "any", "+"], seed=5):
        back = parse_direction(direction_system_prompt(v, ["a", "b", "c"]), ["a", "b", "c"])
        assert max(abs(x - y) for x, y in zip(back, v)) < 0.01  # weights are rounded to 1/100


def test_words_style_spells_the_signs_and_still_parses():
    assert preference_words(direction_at(-math.pi / 4), OBJECTIVES) == "Aim for much more helpfulness and much less verbosity."
    assert preference_words((0.95, 0.3), OBJECTIVES) == "Aim for much more helpfulness and more verbosity."
    assert preference_words((1.0, -0.1), OBJECTIVES) == "Aim for much more helpfulness and slightly less verbosity."
    assert preference_words((1, 0), OBJECTIVES) == "Aim for much more helpfulness."
    assert preference_words((0.2, -0.5, 0.8), ["a", "b", "c"]) == "Aim for slightly more a, less b and much more c."  # weights 21, -52, 83
    prompt = direction_system_prompt((0.8, 0.6), OBJECTIVES, prefix="Hi. ", style="words")
    assert prompt == "Hi. Aim for much more helpfulness and much more verbosity. maximize weighted rating = helpfulness*80 + verbosity*60"
    for v in sample_angle_directions(50, angle_range=(-math.pi / 4, math.pi / 4), seed=3):
        back = parse_direction(direction_system_prompt(v, OBJECTIVES, style="words"), OBJECTIVES)
        assert max(abs(x - y) for x, y in zip(back, v)) < 0.01
    with pytest.raises(ValueError, match="style: expected one of paper, words, got 'prose'"):
        direction_system_prompt((1, 0), OBJECTIVES, style="prose")


@pytest.mark.parametrize("text, message", [
    ("be brief", "no 'maximize weighted rating ='"),
    ("maximize weighted rating = helpfulness*71", "expected 2 terms"),
    ("maximize weighted rating = helpfulness*71 + verbosity*-71 + harmlessness*3", "expected 2 terms"),
    ("maximize weighted rating = helpfulness*0.7 + verbosity*-71", r"term 1 'helpfulness\*0.7' is not"),
    ("maximize weighted rating = verbosity*-71 + helpfulness*71", "term 1 names 'verbosity', expected 'helpfulness'"),
    ("maximize weighted rating = helpfulness*0 + verbosity*0", "every weight is 0"),
    ("maximize weighted rating = helpfulness*71 + verbosity*-71 please", r"term 2 .* is not"),
])
def test_parser_rejects_malformed_text(text, message):
    with pytest.raises(ValueError, match=message):
        parse_direction(text, OBJECTIVES)


def test_objective_names_are_checked():
    with pytest.raises(ValueError, match=r"objectives\[1\]: expected an identifier"):
        direction_system_prompt((1, 0), ["helpfulness", "two words"])
    with pytest.raises(ValueError, match="distinct"):
        direction_system_prompt((1, 0), ["a", "a"])
    with pytest.raises(ValueError, match="v: expected 2 components"):
        direction_system_prompt((1, 0, 0), OBJECTIVES)


def test_weighted_reward():
    assert weighted_reward((3, -4), [50, 10]) == pytest.approx(0.6 * 50 - 0.8 * 10)
    assert weighted_reward((1, 0), {"verbosity": 9, "helpfulness": 2}, OBJECTIVES) == 2
    with pytest.raises(ValueError, match="scores: missing objective 'verbosity'"):
        weighted_reward((1, 0), {"helpfulness": 2}, OBJECTIVES)
    with pytest.raises(ValueError, match="v: expected 2 components"):
        weighted_reward((1, 0, 0), [1, 2])
