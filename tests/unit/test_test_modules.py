"""The test tree itself: pytest imports test modules by their base name (no packages), so two tiers' modules with
one name fail the whole run at collection, which a tier run alone never shows."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_modules_share_a_name() -> None:
    names = Counter(path.name for path in TESTS.rglob("*.py") if path.parent.name != "fixtures")
    assert [name for name, count in names.items() if count > 1 and name != "conftest.py"] == []
