"""The examples in mapengine's docstrings run and hold (examples that run, as
sortedcontainers keeps them). Every module of the package is collected, so a new
module's examples run without touching this file."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import mapengine

MODULES = [
    "mapengine",
    *sorted(m.name for m in pkgutil.iter_modules(mapengine.__path__, "mapengine.")),
]
WITH_EXAMPLES = {"mapengine.history", "mapengine.live", "mapengine.storage"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    res = doctest.testmod(importlib.import_module(name), verbose=False, report=True)
    assert res.failed == 0, f"{res.failed} of {res.attempted} examples in {name} failed"
    if name in WITH_EXAMPLES:
        assert res.attempted > 0, f"the examples of {name} were not found"
