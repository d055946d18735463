"""The built-in plugin of dhruva-file."""

from __future__ import annotations
