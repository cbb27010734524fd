"""docs/PROTOCOL.md's worked example is exactly what the code produces."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_worked_example_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("protocol_example", DOCS / "protocol_example.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = (DOCS / "PROTOCOL.md").read_text(encoding="utf-8")
    assert module.BEGIN in doc and module.END in doc
    assert module.rewrite(doc) == doc, "run: python docs/protocol_example.py"
