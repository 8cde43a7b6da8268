"""Domain errors and HTTP statuses: every kind of domain error has its status in `app.api.errors.STATUS`, and
every code the domain raises is documented in the README's error table under that status."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from app.api.errors import STATUS, status_of
from app.domain import errors

ROOT = Path(__file__).resolve().parents[2]


def kinds() -> list[type[errors.DomainError]]:
    found, todo = [], [errors.DomainError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return [cls for cls in found if cls.__module__ == errors.__name__]


def test_every_kind_of_domain_error_has_a_status():
    assert set(kinds()) <= set(STATUS), set(kinds()) - set(STATUS)
    assert status_of(errors.Conflict("x", code="in_use")) == 409
    assert status_of(errors.not_found("merge", "mj_1")) == 404


def raised_codes() -> set[tuple[str, str]]:
    """(error class, code) of every domain error built with a literal code (or its class's default)."""
    names = {cls.__name__: cls for cls in kinds()}
    found = set()
    for path in (ROOT / "app" / "domain").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names:
                code = next((k.value for k in node.keywords if k.arg == "code"), None)
                if code is None:
                    found.add((node.func.id, names[node.func.id].code))
                elif isinstance(code, ast.Constant):
                    found.add((node.func.id, code.value))
    return found


def documented() -> dict[str, set[int]]:
    """code -> the statuses of its row in the README's error table."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("### Errors") :].split("\n\n")[2]
    codes: dict[str, set[int]] = {}
    for row in table.splitlines()[2:]:
        statuses, described = row.strip("|").split("|", 1)
        for code in re.findall(r"`(\w+)`", described):
            codes.setdefault(code, set()).update(int(s) for s in re.findall(r"\d{3}", statuses))
    return codes


def test_raised_codes_are_documented_under_their_status():
    table = documented()
    found = raised_codes()
    assert len(found) > 20, found
    wrong = {(kind, code) for kind, code in found if STATUS[getattr(errors, kind)] not in table.get(code, set())}
    assert not wrong, wrong
