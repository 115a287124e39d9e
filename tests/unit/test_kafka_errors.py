"""aiokafka's errors, classified at the boundary into the project's errors."""

from __future__ import annotations

import pytest
from aiokafka import errors as kafka
from aiokafka.producer.transaction_manager import TransactionState

from stream.errors import (
    BrokerUnavailable,
    CommitFailed,
    FatalKafkaError,
    NotAuthorized,
    ProducerFencedError,
    RecordRejected,
    SendFailed,
)
from stream.kafka.errors import classify, is_client_error, send_error

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (kafka.TopicAuthorizationFailedError(), NotAuthorized),
        (kafka.GroupAuthorizationFailedError(), NotAuthorized),
        (kafka.KafkaConnectionError("refused"), BrokerUnavailable),
        (kafka.KafkaTimeoutError(), BrokerUnavailable),
        (kafka.CommitFailedError("rebalanced"), CommitFailed),
        (kafka.IllegalStateError("not assigned"), CommitFailed),
        (kafka.ProducerFenced(), ProducerFencedError),
        (kafka.UnsupportedVersionError(), FatalKafkaError),
        (kafka.MessageSizeTooLargeError(), RecordRejected),
    ],
)
def test_client_errors_are_classified(error: Exception, expected: type) -> None:
    classified = classify(error, "consumer", "k1:9092")
    assert type(classified) is expected
    assert str(classified).startswith("consumer")


def test_authorization_says_who_refused() -> None:
    line = str(classify(kafka.TopicAuthorizationFailedError(), "consumer", "k1:9092"))
    assert "k1:9092 refused access" in line


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (kafka.RecordTooLargeError(), RecordRejected),
        (kafka.KafkaTimeoutError(), SendFailed),
        (kafka.NotLeaderForPartitionError(), SendFailed),
        (kafka.TopicAuthorizationFailedError(), NotAuthorized),
    ],
)
def test_send_errors_say_whether_a_retry_can_help(error: Exception, expected: type) -> None:
    classified = send_error(error, "embeddings.a", "k1:9092")
    assert type(classified) is expected and "embeddings.a" in str(classified)


def test_a_send_whose_transaction_is_gone_is_a_client_error_that_a_retry_may_fix() -> None:
    """The CI failure of this session: a zombie's window sent on a producer that the
    rebalance had released, and the unclassified `IllegalOperation` ended the process."""
    error = kafka.IllegalOperation("Can't send messages while not in transaction")
    assert is_client_error(error)
    classified = send_error(error, "embeddings.a", "k1:9092")
    assert type(classified) is SendFailed and "not in transaction" in str(classified)


@pytest.mark.anyio
async def test_a_fenced_transactional_producer_refuses_every_call_with_one_clear_error() -> None:
    from stream.config import KafkaConfig
    from stream.kafka.producer import TransactionalProducer

    producer = TransactionalProducer(KafkaConfig(bootstrap_servers="127.0.0.1:1"), "txn-1")
    try:
        # The state aiokafka's sender leaves when the broker says the producer is fenced.
        producer._producer._txn_manager._transition_to(TransactionState.FATAL_ERROR)
        producer.in_transaction = True  # a window's transaction was open
        with pytest.raises(ProducerFencedError, match="abort txn-1: the producer met a fatal"):
            await producer.abort()  # aiokafka itself: AssertionError on the state transition
        assert not producer.in_transaction
        with pytest.raises(ProducerFencedError, match="begin txn-1"):
            await producer.begin()
        with pytest.raises(ProducerFencedError, match="commit txn-1"):
            await producer.commit("atoms", {0: 1}, "group")
    finally:
        await producer._producer.stop()
