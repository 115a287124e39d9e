"""The on-disk key store behind the skip rule: exact values, on a real RocksDB in tmp_path."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import rocksdict

from stream.state import keystore
from stream.state.keystore import KEYS, LIVE, Counts, KeyStore, Verdict
from stream.state.rocks import StateBusy, StateError

E, T, S = Verdict.EMBED, Verdict.TOMBSTONE, Verdict.SKIP


def test_the_later_offset_wins_whatever_the_order(tmp_path: Path) -> None:
    with KeyStore.open(tmp_path) as store:
        keys = store.partition("mig-1", 0, 0)
        keys.record_history([("a", 5, False), ("a", 2, False), ("b", 3, False)])
        keys.record_history([("a", 4, False), ("b", 7, False)])  # a: 4 < 5, ignored
        assert keys.verdicts([("a", 2), ("a", 4), ("a", 5), ("b", 3), ("b", 7)]) == [
            S, S, E, S, E
        ]  # fmt: skip
        assert keys.should_backfill("a", 5)
        assert not keys.should_backfill("a", 2)
        assert not keys.should_backfill("never-seen", 5)
        assert keys.counts() == Counts(keys=2, deletes=0, live=0, remaining=2, emitted=0, cursor=0)
        assert keys.embeddable_count() == 2


def test_a_range_of_invalid_records_only_still_moves_the_keys_pass(tmp_path: Path) -> None:
    with KeyStore.open(tmp_path) as store:
        keys = store.partition("mig-1", 0, 0)
        keys.record_history([("a", 5, False)], checkpoint=2000)
        keys.record_history([], checkpoint=4000)  # every record of [2000, 4000) invalid
        assert keys.checkpoint(KEYS) == 4000
        assert keys.counts().keys == 1


def test_deletes_cost_no_model_time(tmp_path: Path) -> None:
    with KeyStore.open(tmp_path) as store:
        keys = store.partition("mig-1", 0, 0)
        keys.record_history(
            [("a", 0, False), ("a", 1, True), ("b", 2, True), ("b", 3, False), ("c", 4, True)]
        )
        assert keys.verdicts([("a", 0), ("a", 1), ("b", 2), ("b", 3), ("c", 4)]) == [
            S, T, S, E, T
        ]  # fmt: skip
        assert not keys.should_backfill("a", 1), "a delete is not embedded"
        assert keys.counts() == Counts(keys=3, deletes=2, live=0, remaining=1, emitted=0, cursor=0)
        keys.record_history([("c", 9, False)])  # re-created below the handoff
        assert keys.verdicts([("c", 4), ("c", 9)]) == [S, E]
        assert (keys.counts().deletes, keys.embeddable_count()) == (1, 2)


def test_live_marks_after_history_win(tmp_path: Path) -> None:
    with KeyStore.open(tmp_path) as store:
        keys = store.partition("mig-1", 0, 0)
        keys.record_history([("a", 0, False), ("b", 1, False), ("c", 2, True)])
        keys.mark_live(["a", "c", "new", "a"], checkpoint=120)
        keys.mark_live(["a"])  # again: nothing changes
        assert keys.verdicts([("a", 0), ("b", 1), ("c", 2), ("new", 100)]) == [S, E, S, S]
        assert keys.live_count() == 3
        assert keys.counts() == Counts(keys=3, deletes=1, live=3, remaining=1, emitted=0, cursor=0)
        assert keys.checkpoint(LIVE) == 120
        # the keys pass can still be running when live marks arrive: a mark sticks
        keys.record_history([("a", 3, False), ("new", 4, False)])
        assert keys.verdicts([("a", 3), ("new", 4)]) == [S, S]
        assert keys.counts() == Counts(keys=4, deletes=1, live=3, remaining=1, emitted=0, cursor=0)


def test_progress_total_holds_when_live_writes_follow_emission(tmp_path: Path) -> None:
    with KeyStore.open(tmp_path) as store:
        keys = store.partition("mig-1", 0, 0)
        keys.record_history([("a", 0, False), ("b", 1, False), ("c", 2, False)], checkpoint=3)
        assert keys.counts().total == 3
        assert keys.verdicts([("a", 0), ("b", 1)]) == [E, E]
        keys.advance_emitted(2, embedded=2)
        keys.mark_live(["a", "c"])  # a was embedded already; c now never will be
        assert keys.counts() == Counts(keys=3, deletes=0, live=2, remaining=0, emitted=2, cursor=2)
        assert keys.counts().total == 2
        assert keys.verdicts([("c", 2)]) == [S]
        keys.advance_emitted(3, embedded=0)
        assert keys.counts().total == 2
        with pytest.raises(ValueError):
            keys.advance_emitted(1, embedded=0)
        with pytest.raises(ValueError):
            keys.advance_emitted(3, embedded=-1)


def test_rebuilt_behind_a_cursor_counts_only_what_is_ahead(tmp_path: Path) -> None:
    """A new owner on an empty volume: cursor from the control log, then the keys pass."""
    with KeyStore.open(tmp_path) as store:
        keys = store.partition("mig-1", 0, 0)
        keys.restore_emitted(10, emitted=4)  # the previous owner embedded 4 below 10
        keys.record_history([("a", 3, False), ("b", 12, False), ("c", 15, True)])
        keys.mark_live(["a"])  # embedded by the previous owner before its live write
        assert keys.counts() == Counts(keys=3, deletes=1, live=1, remaining=1, emitted=4, cursor=10)
        assert keys.embeddable_count() == 5
        assert keys.verdicts([("a", 3), ("b", 12), ("c", 15)]) == [S, E, T]
        with pytest.raises(StateError, match="not empty"):
            keys.restore_emitted(10, emitted=4)


def test_restart_gives_the_same_answers_and_checkpoints(tmp_path: Path) -> None:
    events = [("a", 0, False), ("b", 1, False), ("a", 2, False), ("c", 3, True)]
    with KeyStore.open(tmp_path) as store:
        keys = store.partition("mig-1", 3, 1)
        assert keys.checkpoint(KEYS) is None, "an empty directory: redo the keys pass"
        keys.record_history(events, checkpoint=4)
        keys.mark_live(["b"], checkpoint=57)
        keys.advance_emitted(1, embedded=0)
        keys.set_checkpoint("tail-end", 99)
        before = keys.counts()
    with KeyStore.open(tmp_path) as store:
        keys = store.partition("mig-1", 3, 1)
        assert (
            keys.counts()
            == before
            == Counts(keys=3, deletes=1, live=1, remaining=1, emitted=0, cursor=1)
        )
        assert (keys.checkpoint(KEYS), keys.checkpoint(LIVE)) == (4, 57)
        assert keys.checkpoint("tail-end") == 99
        assert keys.verdicts([("a", 0), ("a", 2), ("b", 1), ("c", 3)]) == [S, E, S, T]
        keys.record_history(events, checkpoint=4)  # the pass re-read after a crash: no change
        assert keys.counts() == before


def test_batches_larger_than_one_write_batch(tmp_path: Path) -> None:
    n = keystore.BATCH * 2 + 17
    with KeyStore.open(tmp_path) as store:
        keys = store.partition("mig-1", 0, 0)
        events = ((f"atom-{i % 5000}", i, i % 7 == 0) for i in range(n))  # a generator
        keys.record_history(events, checkpoint=n)
        latest = {f"atom-{i % 5000}": i for i in range(n)}
        deletes = sum(1 for offset in latest.values() if offset % 7 == 0)
        assert keys.counts() == Counts(
            keys=5000, deletes=deletes, live=0, remaining=5000 - deletes, emitted=0, cursor=0
        )
        assert keys.checkpoint(KEYS) == n
        assert keys.verdicts([("atom-1", 1), ("atom-1", latest["atom-1"])]) == [S, E]


def test_partitions_and_epochs_are_separate(tmp_path: Path) -> None:
    with KeyStore.open(tmp_path) as store:
        store.partition("mig-1", 0, 0).record_history([("a", 1, False)])
        assert store.partition("mig-1", 0, 1).verdicts([("a", 1)]) == [S]
        assert store.partition("mig-1", 1, 0).verdicts([("a", 1)]) == [S]
        assert store.partition("mig-2", 0, 0).verdicts([("a", 1)]) == [S]
        assert store.partition("mig-1", 0, 0).verdicts([("a", 1)]) == [E]


def test_drop_deletes_one_partition_and_drop_migration_all(tmp_path: Path) -> None:
    with KeyStore.open(tmp_path) as store:
        first = store.partition("mig/1", 0, 0)
        first.record_history([("a", 1, False)], checkpoint=2)
        store.partition("mig/1", 0, 1).record_history([("b", 1, False)])
        store.partition("other", 0, 0).record_history([("c", 1, False)])
        first.drop()
        assert not (tmp_path / "m-mig%2F1" / "e0-p0").exists()
        with pytest.raises(StateError):
            first.verdicts([("a", 1)])
        again = store.partition("mig/1", 0, 0)
        assert again.checkpoint(KEYS) is None
        assert again.counts() == Counts(0, 0, 0, 0, 0, 0)
        store.drop_migration("mig/1")
        assert not (tmp_path / "m-mig%2F1").exists()
        assert store.partition("other", 0, 0).verdicts([("c", 1)]) == [E]


def test_a_directory_of_another_partition_is_refused(tmp_path: Path) -> None:
    with KeyStore.open(tmp_path) as store:
        store.partition("mig-1", 0, 1).record_history([("a", 1, False)])
    (tmp_path / "m-mig-1" / "e0-p1").rename(tmp_path / "m-mig-1" / "e0-p2")
    with KeyStore.open(tmp_path) as store, pytest.raises(StateError, match="another partition"):
        store.partition("mig-1", 0, 2)


def test_a_held_directory_is_refused(tmp_path: Path) -> None:
    with KeyStore.open(tmp_path) as first, KeyStore.open(tmp_path) as second:
        first.partition("mig-1", 0, 0)
        with pytest.raises(StateBusy, match="cannot open"):
            second.partition("mig-1", 0, 0)
        first.release("mig-1", 0, 0)  # revoked here: the other worker takes it over
        assert second.partition("mig-1", 0, 0).checkpoint(KEYS) is None


def test_an_old_format_is_rebuilt(tmp_path: Path) -> None:
    with KeyStore.open(tmp_path) as store:
        keys = store.partition("mig-1", 0, 0)
        keys.record_history([("a", 1, False)], checkpoint=2)
        keys.set_checkpoint("unused", 0)
    path = str(tmp_path / "m-mig-1" / "e0-p0")
    db = rocksdict.Rdict(path, rocksdict.Options(raw_mode=True))
    db[b"mformat"] = struct.pack(">q", keystore.FORMAT_VERSION + 1)
    db.close()
    with KeyStore.open(tmp_path) as store:
        keys = store.partition("mig-1", 0, 0)
        assert keys.checkpoint(KEYS) is None
        assert keys.verdicts([("a", 1)]) == [S]


def test_a_closed_store_refuses_work(tmp_path: Path) -> None:
    store = KeyStore.open(tmp_path)
    keys = store.partition("mig-1", 0, 0)
    store.close()
    with pytest.raises(StateError):
        keys.mark_live(["a"])
    with pytest.raises(StateError):
        store.partition("mig-1", 0, 0)
