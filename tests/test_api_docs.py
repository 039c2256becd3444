"""docs/api.md is the public API kept in the repository: every exported name is in it."""
import re
from pathlib import Path

import pytest

import fused_margin as fm
from fused_margin import nn as fnn

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"


@pytest.mark.parametrize("module", [fm, fnn], ids=["fused_margin", "fused_margin.nn"])
def test_every_public_name_is_in_docs_api(module):
    text = API.read_text()
    missing = [name for name in module.__all__
               if not re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", text)]
    assert not missing, f"not in docs/api.md: {missing}"


def test_every_public_name_exists():
    for module in (fm, fnn):
        for name in module.__all__:
            assert hasattr(module, name), name


def test_compat_names_are_in_docs_api():
    from fused_margin.compat import insightface, pml

    text = API.read_text()
    for module in (pml, insightface):
        for name in module.__all__:
            assert name in text, name
