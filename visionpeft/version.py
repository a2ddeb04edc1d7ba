"""The package version, in a module of its own so that modules writing it into files (adapter metadata) need not
import the package ``__init__`` (which imports them)."""

__version__ = "0.1.0"
