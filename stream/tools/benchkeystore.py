"""Memory and speed of the keys pass and the skip-rule lookups on the on-disk key store.

    python -m stream.tools.benchkeystore --keys 1000000

Generates `--keys` synthetic atom events (70% new atoms, 20% updates of an earlier atom, 10%
deletes of one, half of them as null values), lazily, so the benchmark itself holds no
per-key state. It measures, on one core:

1. the keys pass decode alone (`keypass.key_events`: `decode_atom` on every record);
2. the whole keys pass (decode + `record_history` in write batches);
3. batched lookups (`verdicts`, as emission uses them) and single `should_backfill` calls,
   one per event, checked against the counters (EMBED verdicts == `remaining`);

and prints VmRSS / VmHWM (from /proc/self/status) before and after, and the size on disk.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from stream.state.keypass import RawRecord, key_events
from stream.state.keystore import KeyStore, Verdict
from stream.state.rocks import Tuning

MAX_EVENT_BYTES = 1 << 20
WORDS = ("stream", "vector", "atom", "kafka", "model", "offset", "embedding", "partition")


def events(count: int, seed: int) -> Iterator[RawRecord]:
    """The synthetic log of one partition, the same for the same seed."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(5, 40))) for _ in range(64)]
    atoms = 0
    for offset in range(count):
        roll = rng.random()
        if atoms == 0 or roll < 0.7:
            atom = atoms
            atoms += 1
        else:
            atom = rng.randrange(atoms)
        # Scrambled ids (like UUIDs): log order says nothing about key order, so lookups in
        # emission order get no help from locality.
        key = f"{(atom * 2654435761) % 2**32:08x}-{atom}"
        if roll >= 0.9 and atoms > 1:
            value = None if roll >= 0.95 else f'{{"type":"atom.deleted","atom_id":"{key}"}}'
        else:
            text = texts[offset % len(texts)]
            value = (
                f'{{"type":"atom.created","atom_id":"{key}","text":"{text}",'
                f'"created_at":"2026-11-27T10:00:00Z","metadata":{{"tenant":"t{atom % 7}"}}}}'
            )
        yield RawRecord(key.encode(), None if value is None else value.encode(), offset)


def memory() -> dict[str, int]:
    """VmRSS and VmHWM in MiB."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(rest.split()[0]) // 1024
    return found


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="events in the log")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lookup-batch", type=int, default=1000)
    parser.add_argument("--cache-mib", type=int, default=Tuning().cache_bytes >> 20)
    parser.add_argument("--dir", type=Path, default=None, help="state directory (a temp one)")
    args = parser.parse_args(argv)
    n: int = args.keys
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        start = memory()
        print(f"start: {start}")

        began = time.perf_counter()
        generated = sum(1 for _ in events(n, args.seed))
        generate_secs = time.perf_counter() - began
        print(f"generating the events alone: {generated / generate_secs:,.0f} events/s")

        began = time.perf_counter()
        decoded = sum(1 for _ in key_events(events(n, args.seed), max_event_bytes=MAX_EVENT_BYTES))
        decode_secs = time.perf_counter() - began
        print(
            f"keys-pass decode (with generation): {n / decode_secs:,.0f} events/s; "
            f"decode alone {n / max(decode_secs - generate_secs, 1e-9):,.0f}/s ({decoded:,} valid)"
        )

        with KeyStore.open(root, Tuning(cache_bytes=args.cache_mib << 20)) as store:
            keys = store.partition("bench", 0, 0)
            began = time.perf_counter()
            keys.record_history(
                key_events(events(n, args.seed), max_event_bytes=MAX_EVENT_BYTES), checkpoint=n
            )
            pass_secs = time.perf_counter() - began
            counts = keys.counts()
            print(
                f"keys pass (generate + decode + store): {n / pass_secs:,.0f} events/s; "
                f"store alone {n / max(pass_secs - decode_secs, 1e-9):,.0f}/s"
            )
            print(f"  {counts}")
            print(f"after keys pass: {memory()}")

            began = time.perf_counter()
            tally = dict.fromkeys(Verdict, 0)
            batch: list[tuple[str, int]] = []
            for record in events(n, args.seed):
                batch.append(((record.key or b"").decode(), record.offset))
                if len(batch) == args.lookup_batch:
                    for verdict in keys.verdicts(batch):
                        tally[verdict] += 1
                    batch.clear()
            for verdict in keys.verdicts(batch):
                tally[verdict] += 1
            lookup_secs = time.perf_counter() - began
            print(
                f"verdicts in batches of {args.lookup_batch}: {n / lookup_secs:,.0f} lookups/s "
                f"(with generation; alone "
                f"{n / max(lookup_secs - generate_secs, 1e-9):,.0f}/s), {tally}"
            )
            if tally[Verdict.EMBED] != counts.remaining:
                raise SystemExit(f"EMBED verdicts {tally[Verdict.EMBED]} != {counts.remaining}")
            if tally[Verdict.TOMBSTONE] != counts.deletes:
                raise SystemExit(f"TOMBSTONE verdicts {tally[Verdict.TOMBSTONE]}")

            began = time.perf_counter()
            wanted = sum(
                keys.should_backfill((record.key or b"").decode(), record.offset)
                for record in events(n, args.seed)
            )
            single_secs = time.perf_counter() - began
            print(
                f"should_backfill one at a time: {n / single_secs:,.0f} lookups/s (with "
                f"generation; alone {n / max(single_secs - generate_secs, 1e-9):,.0f}/s)"
            )
            if wanted != counts.remaining:
                raise SystemExit(f"should_backfill said yes {wanted} times, not {counts.remaining}")
            end = memory()
            print(f"after lookups: {end}")
        size = disk_bytes(Path(root))
        print(f"disk: {size / 2**20:.1f} MiB for {counts.keys:,} keys")
        print(f"RSS growth (VmHWM - start VmRSS): {end['VmHWM'] - start['VmRSS']} MiB")
        print(f"pid {os.getpid()} done")


if __name__ == "__main__":
    main()
