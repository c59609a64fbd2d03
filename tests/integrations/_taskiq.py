"""What the taskiq tests share: a module without taskiq is skipped locally, an error in CI."""

from __future__ import annotations

import importlib.util
import os

import pytest

WHY = "taskiq is not installed (pip install 'pigeon-queue[taskiq]')"


def require_taskiq_module() -> None:
    """Call at the top of a test module, before importing taskiq: skips the module when
    taskiq is missing, and fails it under CI (``CI`` set), whose dev extra has it."""
    if importlib.util.find_spec("taskiq") is not None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{WHY}; CI must provide it (the dev extra has it)", pytrace=False)
    pytest.skip(WHY, allow_module_level=True)
