"""Docstring examples and the README's Python examples, executed against a real service."""

from __future__ import annotations

import doctest
import re
import threading
from pathlib import Path

import pytest

import jobplane
from jobplane import _client, _types, _worker

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("module", [jobplane, _client, _types, _worker], ids=lambda m: m.__name__)
def test_docstring_examples(module: object, addr: str) -> None:
    result = doctest.testmod(
        module, extraglobs={"addr": addr, "jobplane": jobplane}, optionflags=doctest.ELLIPSIS
    )
    assert result.failed == 0, f"{result.failed} docstring example(s) failed"


def test_readme_examples(addr: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block of sdk-python/README.md runs, in order, in one namespace."""
    monkeypatch.setenv("JOBPLANE_ADDR", addr)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has Python examples"
    namespace: dict = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    assert threading.active_count() >= 1
