"""Patterns for ``pytest.raises(match=...)``, which *searches* the message: a test that pins a whole message (so a
mutant that changes a word, drops a value or adds text fails it) builds its pattern here."""
import re


def whole(message: str) -> str:
    """A pattern that matches exactly `message`, from its first character to its last."""
    return r"\A" + re.escape(message) + r"\Z"
