"""The processor's exceptions: one root (`LatticeError`), one line each."""

from schemas.atoms import InvalidAtom
from schemas.errors import LatticeError

__all__ = [
    "BrokerUnavailable",
    "ConfigError",
    "EmbedFailed",
    "FatalKafkaError",
    "InvalidAtom",
    "LatticeError",
    "ModelLoadError",
    "OverlongInput",
]


class ConfigError(LatticeError):
    """The configuration file or an environment override is invalid."""


class ModelLoadError(LatticeError):
    """A configured model cannot be loaded from its directory."""


class BrokerUnavailable(LatticeError):
    """Kafka cannot be reached or refused the request."""


class FatalKafkaError(LatticeError):
    """Kafka returned an error the processor cannot continue after (e.g. a fenced producer)."""


class EmbedFailed(LatticeError):
    """The model raised on an input, after retries."""


class OverlongInput(LatticeError):
    """The text is longer than the model's token window and `on_overlong = "dead_letter"`."""
