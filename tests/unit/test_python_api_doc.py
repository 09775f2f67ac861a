"""docs/python-api.md: how a program gets the package, as it can today (it is not on PyPI)."""

from __future__ import annotations

import re
from pathlib import Path

from scistream import __version__

DOC = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"


def test_the_install_is_from_a_checkout_or_its_wheel_never_from_pypi_by_name():
    text = DOC.read_text()
    assert not re.search(r"pip install scistream\b(?![-/.\w])", text), "scistream is not published on PyPI"
    assert "python -m pip install /path/to/scistream" in text
    assert f"dist/scistream-{__version__}-py3-none-any.whl" in text  # the name pip wheel gives it
