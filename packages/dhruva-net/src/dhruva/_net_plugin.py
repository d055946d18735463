"""The built-in plugin of dhruva-net."""

from __future__ import annotations
