"""Fixtures shared by the unit tests: the helm binary the chart tests render with."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from chart_render import ROOT, TOOLS


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    """The helm 3 binary in .cache/tools, installed there on first use (never skipped)."""
    helm = TOOLS / "helm"
    if not helm.exists():
        subprocess.run([str(ROOT / "scripts" / "install-helm"), str(TOOLS)], check=True)
    return helm
