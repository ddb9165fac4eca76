"""The request path runs without torch: the front end and the Triton models import only
``onerec.runtime`` (numpy, ONNX Runtime, faiss), and the runtime never imports the
offline package. Checked in fresh interpreters, as a serving image would start them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
OFFLINE = ("torch", "pandas", "scipy", "onerec.model", "onerec.train", "onerec.evaluate")
# Triton's python backend provides this module inside the stub; an empty one stands in
# here: the model files touch it only when Triton calls them.
STUB = "import sys, types; sys.modules['triton_python_backend_utils'] = types.ModuleType('t')"


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {OFFLINE!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return set(result.stdout.split())


@pytest.mark.parametrize(
    "code",
    [
        "import server.app",
        *(
            f"{STUB}\nimport runpy; runpy.run_path({str(path)!r})"
            for path in sorted((ROOT / "model_repository").glob("*/1/model.py"))
        ),
    ],
    ids=["front end", "decoder model.py", "encoder model.py", "reward model.py"],
)
def test_the_request_path_loads_no_offline_module(code: str) -> None:
    assert _loaded_after(code) == set()


def test_the_command_line_starts_without_torch() -> None:
    """`onerec serve` and `onerec features load` run in the front-end image, which has no
    torch: the parser (every command's defaults) must not need it."""
    assert "torch" not in _loaded_after("from onerec.cli import build_parser; build_parser()")


def test_the_runtime_imports_nothing_outside_itself() -> None:
    for path in sorted((ROOT / "onerec" / "runtime").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                inside = name == "onerec.runtime" or name.startswith("onerec.runtime.")
                assert inside or not name.startswith(("onerec", "server", "torch")), (path, name)
