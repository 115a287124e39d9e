"""The one exception root of the project; `stream.errors` adds the processor's subclasses."""


class LatticeError(Exception):
    """Root of every error lattice-embed raises on purpose."""
