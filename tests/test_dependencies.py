"""Every package the project imports is declared, so a fresh clone in a fresh virtualenv runs (deptry).

The product (``llmpod/``, the top-level scripts) may import only what ``requirements.txt`` declares; tests and the
benchmark may import ``requirements-dev.txt`` too. A package installed by hand on one machine, or one that only
comes along with another (starlette with FastAPI), fails here instead of on a user's machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def deptry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deptry", ".", "--no-ansi", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_product_imports_only_its_declared_runtime_requirements() -> None:
    # deptry's default scan leaves out tests/: a dev requirement imported by the product is DEP004 here
    result = deptry()
    assert result.returncode == 0, result.stdout + result.stderr


def test_tests_and_bench_import_only_declared_requirements() -> None:
    # everything, tests and bench included; dev requirements are allowed here (DEP004 off)
    result = deptry("--exclude", r"(^|/)(\.venv|venv|\.git|build)(/|$)", "--ignore", "DEP004")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_readmes_command_2_word_for_word() -> None:
    """.ci/run copies README's command 2; an option added to one (``-n 2``) and not the other would make CI
    test something else than what the README promises."""
    readme = (ROOT / "README.md").read_text().splitlines()
    command = readme[next(i for i, line in enumerate(readme) if line.startswith("# 2. ")) + 1]
    assert command.startswith("python3 -m pip install -r requirements-dev.txt && ")
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == command
