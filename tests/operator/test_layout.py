"""The operator/ folder is imhub.operator, never the standard library's ``operator``."""

from __future__ import annotations

import subprocess
import sys

from tests.realservices import REPO


def test_repo_root_does_not_shadow_stdlib_operator() -> None:
    # ``python -c`` puts the current directory first on sys.path.
    proc = subprocess.run(
        [sys.executable, "-c", "import operator, collections, json; print(operator.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert not proc.stdout.strip().startswith(str(REPO))
    assert proc.stdout.strip().endswith("operator.py")


def test_import_name_is_imhub_operator() -> None:
    import imhub.operator
    from imhub.operator import main

    assert imhub.operator.__name__ == "imhub.operator"
    assert callable(main.run)
