"""Build the optional C accelerator of dhruva.persistent.

Everything else about the distribution is in ``pyproject.toml``. The extension
is optional: without a working C compiler (or Python headers) the build warns
and goes on, and :mod:`dhruva.persistent` uses its pure-Python fallback,
:mod:`dhruva._persistent_py`.
"""

from setuptools import Extension, setup  # type: ignore[import-untyped,unused-ignore]

setup(
    ext_modules=[
        Extension(
            "dhruva._persistent",
            sources=["src/dhruva/_persistent.c"],
            optional=True,
        )
    ]
)
