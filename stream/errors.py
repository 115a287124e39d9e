"""The processor's exceptions: one root (`LatticeError`), one line each."""

from schemas.atoms import InvalidAtom
from schemas.errors import LatticeError

__all__ = [
    "BrokerUnavailable",
    "CommitFailed",
    "ConfigError",
    "FatalKafkaError",
    "FingerprintMismatch",
    "InvalidAtom",
    "LatticeError",
    "ModelLoadError",
    "NotAuthorized",
    "OverlongInput",
    "RecordRejected",
    "SendFailed",
    "TargetFailing",
]


class ConfigError(LatticeError):
    """The configuration file or an environment override is invalid."""


class ModelLoadError(LatticeError):
    """A configured model cannot be loaded from its directory."""


class FingerprintMismatch(ModelLoadError):
    """A model's weights or settings differ from the fingerprint the control log recorded."""

    def __init__(self, model: str, current: str, recorded: str) -> None:
        super().__init__(
            f"model {model}: its weights/settings changed (fingerprint {current}, the control "
            f"log has {recorded}); new weights under an old name need a migration to a new "
            "model name, not a restart"
        )
        self.model = model
        self.current = current
        self.recorded = recorded


class TargetFailing(LatticeError):
    """A migration target fails input after input: the model is broken, not the inputs."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(reason)
        self.model = model


class OverlongInput(LatticeError):
    """The text is longer than the model's token window and `on_overlong = "dead_letter"`."""


class BrokerUnavailable(LatticeError):
    """Kafka cannot be reached, or failed a request in a way a retry may fix."""


class NotAuthorized(LatticeError):
    """Kafka refused the request: the principal lacks an ACL for the topic, group or cluster."""


class FatalKafkaError(LatticeError):
    """Kafka returned an error the client cannot continue after (e.g. a fenced producer)."""


class TopicDeleted(FatalKafkaError):
    """A topic the processor reads or writes was deleted while it ran."""


class ProducerFencedError(FatalKafkaError):
    """Another producer with this transactional id started: its partition has a new owner
    (this instance was a zombie). Fatal for that producer only."""


class RecordRejected(LatticeError):
    """The broker refused this one record (too large, invalid); a retry cannot help."""


class SendFailed(LatticeError):
    """A send failed for a reason a retry can fix (no leader, timeout, broker restart)."""


class CommitFailed(LatticeError):
    """A rebalance moved the partition away: its commit (or position) was refused here; the
    new owner redoes the work from the last committed offset."""
