"""Video conditions: text, dicts and ints parse to one digit / direction / speed; errors name the part."""

import pytest
import torch

from diffalign.modalities.video import MotionCondition, MotionConditioner, motion_prompt, parse_condition
from diffalign.modalities.video.conditions import NULL_IDS, all_conditions, condition_ids, parse_conditions


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a 3 moving left, fast", MotionCondition(3, "left", "fast")),
        ("A seven moving UP slowly", MotionCondition(7, "up", "slow")),
        ("quickly downward: 0", MotionCondition(0, "down", "fast")),
        ("a 5", MotionCondition(5)),
        ("something moving right", MotionCondition(None, "right")),
        ({"digit": 3, "direction": "left", "speed": "fast"}, MotionCondition(3, "left", "fast")),
        ({"digit": "4", "direction": "Rightward"}, MotionCondition(4, "right")),
        (9, MotionCondition(9)),
    ],
)
def test_parse_condition(prompt, expected):
    assert parse_condition(prompt) == expected


def test_canonical_text_round_trips_and_velocity():
    for c in all_conditions():
        assert parse_condition(c.text()) == c
    assert len(all_conditions()) == 80
    assert motion_prompt(3, "left", "fast") == "a 3 moving left, fast"
    assert motion_prompt(3) == "a 3" and parse_condition(motion_prompt(None, None, "slow")).speed == "slow"
    assert MotionCondition(1, "left", "fast").velocity == (0.0, -2.0)
    assert MotionCondition(1, "down", "slow").velocity == (1.0, 0.0)
    assert MotionCondition(1, "down").velocity is None


def test_bad_conditions_are_named():
    with pytest.raises(ValueError, match="direction"):
        parse_condition({"digit": 3, "direction": "sideways"})
    with pytest.raises(KeyError, match="colour"):
        parse_condition({"digit": 3, "colour": "red"})
    with pytest.raises(ValueError, match="digit"):
        parse_condition(12)
    with pytest.raises(TypeError):
        parse_condition(3.5)
    with pytest.raises(ValueError, match="2 prompts for 3 clips"):
        parse_conditions(["a 1", "a 2"], 3)
    with pytest.raises(ValueError, match="cond\\['prompt'\\]"):
        parse_conditions(None, 3, "MotionAgreement")


def test_condition_ids_and_conditioner():
    ids = condition_ids([MotionCondition(3, "up", "fast"), MotionCondition()])
    assert ids.tolist() == [[3, 2, 1], list(NULL_IDS)]
    conditioner = MotionConditioner(8)
    enc = conditioner.encode(["a 3 moving up, fast", {"digit": 3, "direction": "up", "speed": "fast"}, 3])
    assert enc["motion_ids"][0].tolist() == enc["motion_ids"][1].tolist() == [3, 2, 1]
    assert enc["motion_ids"][2].tolist() == [3, NULL_IDS[1], NULL_IDS[2]]
    hidden = conditioner(enc["motion_ids"])
    assert hidden.shape == (3, 3, 8) and torch.allclose(hidden[0], hidden[1])
    null = conditioner.null(enc)["motion_ids"]
    assert null.tolist() == [list(NULL_IDS)] * 3
    with pytest.raises(TypeError, match="list"):
        conditioner.encode("a 3")
