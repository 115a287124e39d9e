"""aiokafka's errors, classified at the boundary into the project's errors."""

from __future__ import annotations

import pytest
from aiokafka import errors as kafka

from stream.errors import (
    BrokerUnavailable,
    CommitFailed,
    FatalKafkaError,
    NotAuthorized,
    ProducerFencedError,
    RecordRejected,
    SendFailed,
)
from stream.kafka.errors import classify, send_error

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
