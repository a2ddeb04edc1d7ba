"""Integrations with other libraries: :mod:`.ultralytics` is the one module touching Ultralytics internals."""
