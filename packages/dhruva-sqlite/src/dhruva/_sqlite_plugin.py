"""The built-in plugin of dhruva-sqlite."""

from __future__ import annotations
