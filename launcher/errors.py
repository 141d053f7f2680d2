"""The one exception the CLI turns into `error: ...` lines and exit code 2."""

from __future__ import annotations

import difflib


class UserError(Exception):
    """Bad input from the user: a file, a key, a value or a layout that cannot work.

    Carries one or more problems; each is a single line that names where the problem is,
    the value found and how to fix it. Never shown with a traceback.
    """

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


def closest(word: str, choices) -> str:
    """' (did you mean X?)' for the nearest valid spelling, or '' when nothing is near."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
