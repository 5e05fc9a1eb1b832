"""kopf imported without the kubernetes client, which kopf only probes for and the operator does not use."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def import_kopf() -> ModuleType:
    """Import kopf with ``kubernetes`` hidden from its import-time probe (kopf accepts that client's model objects
    when it is installed, and the probe imports its thousand generated modules: about 50 MB of the operator's
    memory). Once kopf is in, ``kubernetes`` imports normally again (a kubeconfig with an exec plugin needs it)."""
    if "kopf" in sys.modules or "kubernetes" in sys.modules:
        return importlib.import_module("kopf")
    # A None entry makes ``import kubernetes`` raise ImportError, which kopf takes as "not installed".
    sys.modules["kubernetes"] = None  # type: ignore[assignment]
    try:
        return importlib.import_module("kopf")
    finally:
        if sys.modules.get("kubernetes", ...) is None:
            del sys.modules["kubernetes"]
