"""Every setting is documented once, in README.md's table generated from the classes."""

from __future__ import annotations

import ast
from pathlib import Path

from producer.settings import ClientSettings
from slotfill.cli import settings_doc
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent


def test_readme_table_is_generated_from_the_settings_classes() -> None:
    readme = (ROOT / "README.md").read_text()
    assert settings_doc.current(readme) == settings_doc.block(), (
        "README.md's settings table is stale: run `python -m slotfill.cli.settings_doc --write`")


def test_every_setting_appears_once_with_a_description() -> None:
    readme = (ROOT / "README.md").read_text()
    names = {*ClientSettings.model_fields, *WorkerSettings.model_fields}
    for name in names:
        assert readme.count(f"| `SLOTFILL_{name.upper()}` |") == 1, name
    for var, _default, _who, doc in settings_doc.rows():
        assert doc, f"{var} has no description (add a docstring under the field)"


def test_no_undocumented_settings_class() -> None:
    documented = {"ClientSettings", "WorkerSettings"}
    settings_bases = {"BaseSettings", *documented}
    found = set()
    for pkg in ("producer", "worker", "bench"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "")
                             for b in node.bases}
                    if bases & settings_bases:
                        found.add(node.name)
    assert found <= documented, f"settings classes missing from the README table: {found - documented}"
