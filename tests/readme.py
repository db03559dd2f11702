"""The README's examples, run as written by the tests of what they show."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def run_example(heading: str) -> dict:
    """Runs the first Python snippet after the README heading ``heading`` and returns the
    variables it left."""
    text = README.read_text()
    section = text[text.index(heading):]
    code = section[section.index("```python\n") + 10:section.index("```\n", 10)]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope
