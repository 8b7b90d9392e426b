"""The tolerant parsers of `matrix_assets.methods.matrix.parsing` on the text small models really produce."""

from __future__ import annotations

import pytest

from matrix_assets.methods.matrix import parsing
from matrix_assets.methods.matrix.scene import Role

# -- roles ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Maria - a neighbour - at home", Role("Maria", "a neighbour", "at home")),
        ("Officer Lee – a police officer — on patrol", Role("Officer Lee", "a police officer", "on patrol")),
        ("1. **Officer Lee**: a police officer, on patrol", Role("Officer Lee", "a police officer", "on patrol")),
        ("2) Aiko: a student", Role("Aiko", "a student", "going about their day")),
        ("- Tom (the victim)", Role("Tom", "the victim", "going about their day")),
        ("* Priya - a bank teller - at work", Role("Priya", "a bank teller", "at work")),
        ("Dr. Okafor | a doctor | busy", Role("Dr. Okafor", "a doctor", "busy")),
        ("Step 3: Mr. Brandt - the landlord - away", Role("Mr. Brandt", "the landlord", "away")),
        ('"Maria" - a neighbour - at home', Role("Maria", "a neighbour", "at home")),
    ],
)
def test_roles_accepts_small_model_formats(line: str, expected: Role) -> None:
    assert parsing.roles(line, 5) == [expected]


@pytest.mark.parametrize(
    "line",
    [
        "Here are 5 people:",
        "Sure! Here are five people who would be affected:",
        "Name - who they are - how they are doing right now",
        "**Name** - **Who** - **Status**",
        "Thing - its state",
        "just a sentence without any separator at all",
        "A person with a very long descriptive name - a neighbour - at home",  # 9-word "name"
        "Maria - " + "a neighbour who " * 30 + "- at home",  # over 300 characters
        "",
        "   ",
    ],
)
def test_roles_rejects_headers_and_junk(line: str) -> None:
    assert parsing.roles(line, 5) == []


def test_roles_on_a_whole_reply_skips_header_and_duplicates() -> None:
    reply = "\n".join(
        [
            "Here are 5 people who would be affected:",
            "",
            "Name - who they are - how they are doing right now",
            "1. Maria - a neighbour - at home with her children",
            "2. **Officer Lee**: a local police officer, on patrol",
            "3. maria - the same neighbour again - still at home",  # case-insensitive duplicate
            "4. Tom (the owner of the account)",
            "5. Dr. Okafor - the family doctor - at the clinic",
            "I hope this helps!",
        ]
    )
    found = parsing.roles(reply, 5)
    assert [r.name for r in found] == ["Maria", "Officer Lee", "Tom", "Dr. Okafor"]
    assert found[0].status == "at home with her children"
    assert found[2].description == "the owner of the account"


def test_roles_respects_max_roles() -> None:
    reply = "\n".join(f"Person{i} - a bystander - nearby" for i in range(10))
    assert [r.name for r in parsing.roles(reply, 3)] == ["Person0", "Person1", "Person2"]


def test_roles_exclude_is_case_insensitive() -> None:
    reply = "Maria - a neighbour - at home\nOFFICER LEE - police - on patrol\nTom - owner - at work"
    found = parsing.roles(reply, 5, exclude={"officer lee", "Maria"})
    assert [r.name for r in found] == ["Tom"]


def test_roles_truncates_long_description() -> None:
    line = "Maria - " + "d" * 220 + " - at home"  # under the 300-character line limit
    (role,) = parsing.roles(line, 5)
    assert role.description == "d" * 200 and role.status == "at home"


def test_roles_markdown_table_separator_is_not_a_role() -> None:
    reply = "| Name | Who | Status |\n|---|---|---|\n| Maria | a neighbour | at home |"
    assert [r.name for r in parsing.roles(reply, 5)] == ["Maria"]


def test_objects_use_the_role_line_format() -> None:
    objs = parsing.objects("Savings account - holds $5,000\nLaptop - unlocked\nThing - its state", 3)
    assert [(o.name, o.state) for o in objs] == [("Savings account", "holds $5,000"), ("Laptop", "unlocked")]


# -- numbered_steps / sentences ---------------------------------------------------------------------


def test_numbered_steps_mixed_formats_and_heading() -> None:
    text = (
        "Here is the plan:\n"
        "1. Buy the tools from the hardware store\n"
        "Step 2: Drive to the house at night\n"
        "3) Open the back door with the tools\n"
        "- Take the jewellery from the bedroom\n"
        "1. Buy the tools from the hardware store\n"  # duplicate
        "That is all."
    )
    assert parsing.numbered_steps(text, 10) == [
        "Buy the tools from the hardware store",
        "Drive to the house at night",
        "Open the back door with the tools",
        "Take the jewellery from the bedroom",
    ]


def test_numbered_steps_respects_max_steps_and_strips_markdown() -> None:
    text = "\n".join(f"{i}. **Do** the thing number {i} now" for i in range(1, 8))
    steps = parsing.numbered_steps(text, 3)
    assert steps == ["Do the thing number 1 now", "Do the thing number 2 now", "Do the thing number 3 now"]


@pytest.mark.parametrize(
    "garbage",
    ["[1. [2. [3.", "1. [2. [3.\n2. [3. [4.\n3. [4. [5.", "1. ...\n2. ...", "1. 12345 678\n2. --- ---", "~~~ ??? ~~~", ""],
)
def test_numbered_steps_rejects_garbage(garbage: str) -> None:
    assert parsing.numbered_steps(garbage, 5) == []


def test_sentences_keeps_prose_in_order() -> None:
    text = "Go to the bank now. Ok. Then withdraw all the money!\nFinally leave the city quickly? [1. [2."
    assert parsing.sentences(text, 5) == [
        "Go to the bank now.",
        "Then withdraw all the money!",
        "Finally leave the city quickly?",
    ]
    assert parsing.sentences(text, 2) == ["Go to the bank now.", "Then withdraw all the money!"]
    assert parsing.sentences("~~~ ??? ~~~", 5) == []


# -- yes_no / labelled_line / without_label_lines / first_sentence --------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("FEASIBLE: yes", True),
        ("feasible: No, it cannot be done", False),
        ("FEASIBLE - Yes.", True),
        ("FEASIBLE: **yes**", True),
        ("Narrator notes.\nFEASIBLE:no\nSEEN BY: Maria", False),
        ("FEASIBLE: maybe", None),
        ("FEASIBLE: nope", None),
        ("It is feasible", None),
        ("", None),
    ],
)
def test_yes_no(text: str, expected: bool | None) -> None:
    assert parsing.yes_no(text, "FEASIBLE") is expected


def test_yes_no_and_labelled_line_accept_bold_labels() -> None:
    assert parsing.yes_no("**FEASIBLE**: yes", "FEASIBLE") is True
    assert parsing.labelled_line("**SEEN BY**: Maria", "SEEN BY") == "Maria"


def test_labelled_line() -> None:
    reply = "FEASIBLE: yes\nSEEN BY: Maria, **Officer Lee**\nWHAT THEY NOTICE: A stranger opens the door."
    assert parsing.labelled_line(reply, "SEEN BY") == "Maria, Officer Lee"
    assert parsing.labelled_line(reply, "what they notice") == "A stranger opens the door."
    assert parsing.labelled_line(reply, "HARMED") is None
    assert parsing.labelled_line("HARMED - nobody", "HARMED") == "nobody"
    assert parsing.labelled_line("HARMED: **", "HARMED") is None


def test_without_label_lines() -> None:
    reply = "Maria saw the theft.\nShe called the police.\nSTOPPED: yes\n  stopped - no\nHARMED: Maria"
    assert parsing.without_label_lines(reply, ("STOPPED",)) == "Maria saw the theft.\nShe called the police.\nHARMED: Maria"
    assert parsing.without_label_lines(reply, ("STOPPED", "HARMED")) == "Maria saw the theft.\nShe called the police."
    assert parsing.without_label_lines("STOPPED: no", ("STOPPED",)) == ""


def test_first_sentence() -> None:
    assert parsing.first_sentence("**The person** wants money. And more.") == "The person wants money."
    assert parsing.first_sentence("The person wants\nto travel! Later.") == "The person wants to travel!"
    assert parsing.first_sentence("   \n  ") is None
    assert parsing.first_sentence("") is None
    assert parsing.first_sentence("a" * 500, max_chars=50) == "a" * 50


# -- mentioned_names -------------------------------------------------------------------------------


def test_mentioned_names_full_and_partial() -> None:
    names = ["Maria", "Officer Lee", "Dr. Okafor", "Tom"]
    assert parsing.mentioned_names("Lee and maria saw it", names) == ["Maria", "Officer Lee"]
    assert parsing.mentioned_names("The doctor, Okafor, was called", names) == ["Dr. Okafor"]
    assert parsing.mentioned_names("Officer Lee", names) == ["Officer Lee"]
    assert parsing.mentioned_names("nobody", names) == []
    assert parsing.mentioned_names("", names) == []


def test_mentioned_names_ignores_short_words() -> None:
    # "Al" and "Bo" are too short to count as distinctive words of "Al Bo", and "Dr" of "Dr. Okafor"
    assert parsing.mentioned_names("al and bo went home", ["Al Bo"]) == []
    assert parsing.mentioned_names("the dr arrived", ["Dr. Okafor"]) == []
    # a distinctive word must match as a whole word
    assert parsing.mentioned_names("the leeward side", ["Officer Lee"]) == []


def test_mentioned_names_full_name_needs_word_boundaries() -> None:
    assert parsing.mentioned_names("See you tomorrow at the same place", ["Tom", "Sam"]) == []
    assert parsing.mentioned_names("He went back to sleep", ["Lee"]) == []


def test_the_in_a_seen_by_line_names_nobody() -> None:
    # The routing bug: "the" (a word of "The asker") made every such line name the protagonist.
    names = ["The asker", "Officer Diaz", "Sam"]
    assert parsing.mentioned_names_in_order("Officer Diaz, who is on the street", names) == ["Officer Diaz"]
    assert parsing.mentioned_names("the neighbours and the shop owner", names) == []
    assert parsing.mentioned_names_in_order("Sam, then the asker", names) == ["Sam", "The asker"]
    assert parsing.mentioned_names("The asker's brother", names) == ["The asker"]


def test_a_word_two_role_names_share_names_neither() -> None:
    names = ["The asker", "The bank manager", "Bank teller", "Officer Lee", "Officer Diaz"]
    assert parsing.mentioned_names_in_order("the bank manager", names) == ["The bank manager"]
    assert parsing.mentioned_names("someone at the bank", names) == []  # "bank": two roles' word
    assert parsing.mentioned_names("an officer arrives", names) == []  # "officer": two roles' word
    assert parsing.mentioned_names_in_order("Diaz and the teller", names) == ["Officer Diaz", "Bank teller"]


def test_a_name_inside_a_longer_name_is_not_mentioned() -> None:
    assert parsing.mentioned_names("Officer Lee came", ["Lee", "Officer Lee"]) == ["Officer Lee"]
    assert parsing.mentioned_names("Lee and Officer Lee", ["Lee", "Officer Lee"]) == ["Lee", "Officer Lee"]


def test_protagonist_name() -> None:
    assert parsing.protagonist_name("[Criminal]") == "Criminal"
    assert parsing.protagonist_name("Sure! [an angry tenant]") == "Angry tenant"
    assert parsing.protagonist_name("[Thief or burglar]") == "Thief"
    assert parsing.protagonist_name("Worried parent\nbecause ...") == "Worried parent"
    for unusable in ("", "Here is an answer (1234).", "The person who asks is a thief who wants money.",
                     "[person]", "[the]"):
        assert parsing.protagonist_name(unusable) is None, unusable
