"""The describe and instruct prompts, demonstration sampling, and reply parsing (no model)."""

from __future__ import annotations

import json

import pytest

from megapairs_ray.synth.prompts import (
    DESCRIBE_INSTRUCTION,
    demonstration_pool,
    describe_messages,
    describe_text,
    instruct_prompt,
    parse_instructions,
    sample_demonstrations,
    word_num,
)


def test_pool_has_fifty_demonstrations_including_the_published_two():
    pool = demonstration_pool()
    assert len(pool) == 50
    assert len({d.connection for d in pool}) == 50
    assert pool[0].queries[1] == "Remove the small heart symbol"
    assert pool[1].queries[2] == "What if this plane is put indoors?"
    for d in pool:  # every one in the paper's form
        assert d.connection.startswith("Both images ")
        assert "However, the Source Image" in d.connection and "whereas the Target Image" in \
            d.connection
        assert len(d.queries) >= 3


def test_word_num_is_seeded_per_pair_and_in_range():
    values = [word_num(f"pair-{i}") for i in range(400)]
    assert min(values) >= 60 and max(values) <= 100
    assert len(set(values)) > 30  # drawn, not constant
    assert values == [word_num(f"pair-{i}") for i in range(400)]
    assert [word_num(f"pair-{i}", seed=1) for i in range(50)] != values[:50]


def test_describe_prompt_is_the_papers_with_both_images_in_order():
    text = describe_text("p1")
    assert text == DESCRIBE_INSTRUCTION.replace("WORD_NUM", str(word_num("p1")))
    assert "WORD_NUM" not in text and f"under {word_num('p1')} words" in text
    (msg,) = describe_messages("p1", "SRC", "TGT")
    kinds = [(c["type"], c.get("image", c.get("text"))) for c in msg["content"]]
    assert kinds[:4] == [("text", "Source Image: "), ("image", "SRC"),
                         ("text", "\nTarget Image: "), ("image", "TGT")]


def test_instruct_prompt_draws_five_demonstrations_per_pair():
    desc = ("Both images show a dog. However, the Source Image is dry, "
            "whereas the Target Image is wet.")
    p = instruct_prompt("pair-7", desc)
    assert p.startswith("## Instruction: Based on the provided connection")
    assert p.count("- Connection:") == 6 and p.count("- Text Query:") == 6
    assert p.endswith(f"## Your Task:\n- Connection: {desc}\n- Text Query:")
    demos = sample_demonstrations("pair-7")
    assert len({d.connection for d in demos}) == 5
    for d in demos:
        assert f"- Text Query: {json.dumps(list(d.queries))}" in p
    others = {tuple(x.connection for x in sample_demonstrations(f"pair-{i}")) for i in range(20)}
    assert len(others) > 15


@pytest.mark.parametrize("reply", [
    '["Make it red.", "The same car, but red.", "A red version of this vehicle."]',
    'Sure! Here are the queries:\n```json\n["Make it red.", "The same car, but red.", '
    '"A red version of this vehicle."]\n```\nHope this helps.',
    "['Make it red.', 'The same car, but red.', 'A red version of this vehicle.']",
    '1. "Make it red."\n2. "The same car, but red."\n3. "A red version of this vehicle."',
    "- Make it red.\n- The same car, but red.\n- A red version of this vehicle.",
])
def test_parser_finds_the_list_in_any_common_reply_form(reply):
    parsed = parse_instructions(reply)
    assert parsed.instructions == ["Make it red.", "The same car, but red.",
                                   "A red version of this vehicle."]
    assert parsed.usable and not parsed.problem


def test_parser_drops_and_counts_junk():
    reply = json.dumps(["Make it red.", "make it red", "", "x", "A" * 400,
                        "- Connection: Both images show", "\x0e\x01\ud800", "Paint it blue."])
    parsed = parse_instructions(reply)
    assert parsed.instructions == ["Make it red.", "Paint it blue."]
    assert dict(parsed.dropped) == {"duplicate": 1, "empty": 1, "too_short": 1, "too_long": 1,
                                    "prompt_echo": 1, "unprintable": 1}
    assert not parsed.usable  # fewer than 3 left


def test_parser_removes_invisible_characters_and_keeps_the_rest():
    # As a JSON reply spells them: escapes for a control character and a lone surrogate.
    reply = '["Make it\\u000e red.", "Paint it\\ud800 blue.", "A green \\u0007one."]'
    parsed = parse_instructions(reply)
    assert parsed.instructions == ["Make it red.", "Paint it blue.", "A green one."]
    assert dict(parsed.dropped) == {"unprintable_removed": 3}
    assert all(s.isprintable() for s in parsed.instructions)


def test_parser_reports_a_reply_without_a_list():
    parsed = parse_instructions("I cannot help with that.")
    assert parsed.problem == "no_list" and parsed.instructions == []
