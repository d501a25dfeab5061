"""The code passes the project's linters, with the settings of pyproject.toml ([tool.ruff], [tool.mypy]).

They come with ``pip install -e ".[lint]"`` (CI installs them); without them these tests skip.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [("ruff", "check"), ("mypy",)], ids=["ruff", "mypy"])
def test_the_code_passes(command: tuple[str, ...]) -> None:
    if importlib.util.find_spec(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed (pip install -e '.[lint]')")
    result = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(command)} found problems:\n{result.stdout}{result.stderr}"


def test_the_package_tells_type_checkers_it_is_typed() -> None:
    """PEP 561: with py.typed installed beside the code, mypy and pyright read neuroloc's annotations in users' code."""
    from importlib.resources import files

    assert files("neuroloc").joinpath("py.typed").is_file()
    assert '"py.typed"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # shipped in the wheel too
