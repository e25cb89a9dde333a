"""The files that run on the node (the plugin zipapp) stay valid Python 3.9, standard library only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

HOST_FILES = ["__init__.py", "selection.py", "plugin.py"]
CNI = Path(__file__).resolve().parents[3] / "cni"


@pytest.mark.parametrize("name", HOST_FILES)
def test_parses_as_python_39(name: str) -> None:
    source = (CNI / name).read_text()
    tree = ast.parse(source, feature_version=(3, 9))
    for node in ast.walk(tree):
        # 3.10+ at run time: dataclass(slots=...), zip(strict=...), X | Y outside annotations.
        if isinstance(node, ast.keyword):
            assert node.arg not in ("slots", "strict", "kw_only"), f"{name}: {node.arg}= needs 3.10"
        assert not isinstance(node, ast.Match), f"{name}: match needs 3.10"
    assert "from __future__ import annotations" not in source or name == "plugin.py"


@pytest.mark.parametrize("name", HOST_FILES)
def test_imports_only_the_standard_library_and_itself(name: str) -> None:
    tree = ast.parse((CNI / name).read_text())
    for node in ast.walk(tree):
        mods = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods = [node.module]
        for m in mods:
            top = m.split(".")[0]
            assert top == "cni" or top in sys.stdlib_module_names, f"{name} imports {m}"
