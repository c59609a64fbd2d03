"""Test-suite settings: Hypothesis without per-example deadlines (CI machines are busy;
tests assert behaviour, never speed)."""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("pigeon", deadline=None)
settings.load_profile("pigeon")
