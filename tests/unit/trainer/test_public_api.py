"""The package exports exactly its public API, and every name exists."""

from __future__ import annotations

import ast
from pathlib import Path

from services import trainer


def test_every_exported_name_exists_and_nothing_private_leaks() -> None:
    assert len(set(trainer.__all__)) == len(trainer.__all__)
    for name in trainer.__all__:
        assert hasattr(trainer, name), name
        assert not name.startswith("_")


def test_the_trainer_package_imports_no_other_service() -> None:
    root = Path(trainer.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = node.module
            elif isinstance(node, ast.Import):
                module = node.names[0].name
            else:
                continue
            if module.startswith("services."):
                assert module.startswith("services.trainer"), f"{path.name} imports {module}"
