"""aiokafka's errors, classified in one place into the project's `LatticeError`s.

Nothing outside `stream/kafka/` imports `aiokafka.errors`: the boundary raises
`BrokerUnavailable`, `NotAuthorized`, `RecordRejected`, `SendFailed`, `CommitFailed` or
`FatalKafkaError`, each with a line that says what failed and where.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiokafka import errors as kafka

from stream.errors import (
    BrokerUnavailable,
    CommitFailed,
    FatalKafkaError,
    LatticeError,
    NotAuthorized,
    ProducerFencedError,
    RecordRejected,
    SendFailed,
)

# Errors that belong to one record: retrying cannot help, so the input becomes a dead letter.
_RECORD_ERRORS = (
    kafka.MessageSizeTooLargeError,
    kafka.RecordTooLargeError,
    kafka.RecordListTooLargeError,
)
_AUTHORIZATION_ERRORS = (
    kafka.TopicAuthorizationFailedError,
    kafka.GroupAuthorizationFailedError,
    kafka.ClusterAuthorizationFailedError,
    kafka.TransactionalIdAuthorizationFailed,
)
_FATAL_ERRORS = (kafka.UnsupportedVersionError,)
# A transactional producer whose id another producer took over (or whose epoch is stale).
_FENCED_ERRORS = (kafka.ProducerFenced, kafka.TransactionCoordinatorFenced)
# A commit refused by a rebalance (IllegalStateError: the partition is no longer assigned).
COMMIT_ERRORS = (
    kafka.CommitFailedError,
    kafka.IllegalGenerationError,
    kafka.RebalanceInProgressError,
    kafka.IllegalStateError,
)


# The idempotent producer's sequence state is broken (batches expired or were lost in a long
# outage): every later send fails the same way until the producer is replaced.
PRODUCER_RESET_ERRORS = (
    kafka.OutOfOrderSequenceNumber,
    kafka.UnknownProducerId,
    kafka.InvalidProducerEpoch,
)


def needs_new_producer(exc: BaseException) -> bool:
    """Whether only a new producer (a new producer id) can send again after `exc`."""
    return isinstance(exc, PRODUCER_RESET_ERRORS)


def classify(
    exc: BaseException,
    what: str,
    bootstrap_servers: str,
    *,
    retriable: type[LatticeError] = BrokerUnavailable,
) -> LatticeError:
    """The `LatticeError` that stands for an aiokafka error raised while doing `what`;
    `retriable` is the class of what a retry may fix."""
    if isinstance(exc, LatticeError):
        return exc
    if isinstance(exc, _AUTHORIZATION_ERRORS):
        return NotAuthorized(f"{what}: Kafka at {bootstrap_servers} refused access: {exc!r}")
    if isinstance(exc, _RECORD_ERRORS):
        return RecordRejected(f"{what}: the broker refused the record: {exc!r}")
    if isinstance(exc, COMMIT_ERRORS):
        return CommitFailed(f"{what}: the group rebalanced: {exc!r}")
    if isinstance(exc, _FENCED_ERRORS):
        return ProducerFencedError(f"{what}: fenced by a newer producer with this id: {exc!r}")
    if isinstance(exc, _FATAL_ERRORS):
        return FatalKafkaError(f"{what}: {exc!r}")
    if isinstance(exc, kafka.KafkaConnectionError):
        return retriable(
            f"{what}: cannot connect to Kafka at {bootstrap_servers} (unreachable, or its "
            f"TLS/SASL settings refused ours): {exc}"
        )
    return retriable(f"{what} failed: Kafka error from {bootstrap_servers}: {exc!r}")


def send_error(exc: BaseException, topic: str, bootstrap_servers: str) -> LatticeError:
    """A failed send to `topic`: `RecordRejected` for this record alone, `SendFailed` when a
    retry may succeed."""
    return classify(exc, f"send to {topic}", bootstrap_servers, retriable=SendFailed)


def is_client_error(exc: BaseException) -> bool:
    """Whether `exc` comes from the Kafka client (so `classify` applies to it).

    `IllegalOperation` is not a `KafkaError`, but a send raises it when the transaction it
    belonged to is gone under it (a zombie's window whose producer a rebalance released):
    that send failed, and a retry of the window on the current producer may succeed."""
    return isinstance(exc, kafka.KafkaError | kafka.IllegalOperation)


@contextlib.asynccontextmanager
async def kafka_errors(what: str, bootstrap_servers: str) -> AsyncIterator[None]:
    """Re-raise aiokafka's errors inside the block as classified `LatticeError`s."""
    try:
        yield
    except kafka.KafkaError as exc:
        raise classify(exc, what, bootstrap_servers) from exc
