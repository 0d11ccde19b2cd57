"""The leave-one-out split, defined once: every stage that reads a user's interactions cuts them here.

A user's chronological sequence ends with the test item (the last interaction) and, before it, the validation item.
Everything before those two is the user's *training* part: the only interactions whose items, reviews, ratings and
titles may reach text derived from the user (preferences, index inputs, training prompts). `include_heldout_text` on
`preferences` and `index` is the named way to read everything (to reproduce an artifact built that way); it is
recorded wherever the text is used.
"""

HELD_OUT = 2  # validation + test
PER_INTERACTION = ("items", "ratings", "timestamps", "reviews", "summaries")  # the per-interaction lists of a prepared user
IMPORTED = "imported: possibly built from all interactions, validation and test included (the project cannot check it)"


def training_part(sequence: list) -> list:
    """All but the last two interactions."""
    return list(sequence[:-HELD_OUT])


def validation_pair(sequence: list) -> tuple[list, object]:
    """(history, target) of the validation split: the training part, then the second-to-last item."""
    return list(sequence[:-HELD_OUT]), sequence[-HELD_OUT]


def test_pair(sequence: list) -> tuple[list, object]:
    """(history, target) of the test split: everything but the last item, then the last item."""
    return list(sequence[:-1]), sequence[-1]


def user_view(row: dict, include_heldout: bool = False) -> dict:
    """A prepared user row with every per-interaction list cut to the training part (unless `include_heldout`)."""
    if include_heldout:
        return row
    return {key: training_part(value) if key in PER_INTERACTION and isinstance(value, list) else value for key, value in row.items()}


def text_scope(include_heldout: bool) -> str:
    """How a stage's recorded settings name the interactions its user text came from."""
    return "all interactions (validation and test included: include_heldout_text)" if include_heldout else "training interactions only"
