"""An example third-party dhruva storage: the ``snapshot`` kind.

See :mod:`dhruva_example_storage.snapshot_storage` for the storage and
:mod:`dhruva_example_storage.plugin` for the hooks that make dhruva find it.
"""
