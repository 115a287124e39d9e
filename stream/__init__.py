"""lattice-embed: keeps vector indexes current while their embedding model changes."""

__version__ = "0.1.0"
