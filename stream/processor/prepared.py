"""A window decoded and tokenized ahead of its turn: the live path's lookahead (issue 12).

While one window's forward passes run, the live path fetches the next window and prepares
it here: each record decoded (an invalid one keeps its error, for the dead letter that its
own turn writes) and the distinct texts of its valid creates tokenized once per tokenizer
of the write models. Nothing here writes anything: the window's turn does, in order, so
preparing ahead changes no output and no offset.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from schemas.atoms import AtomCreated, AtomEvent, InvalidAtom, decode_atom
from stream.core.records import SourceRecord
from stream.embed.embedder import Embedder, Tokenized
from stream.processor.inference import Inference
from stream.processor.stages import StageClock, cpu


@dataclass(frozen=True)
class PreparedWindow:
    """`decoded[i]` is `records[i]`'s event or its error; `tokens` holds the ids of `texts`
    (the distinct texts of the valid creates, in window order) by tokenization key."""

    records: Sequence[SourceRecord]
    decoded: Sequence[AtomEvent | InvalidAtom]
    texts: list[str]
    tokens: dict[str, Tokenized]

    def fits(self, records: Sequence[SourceRecord]) -> bool:
        """Whether this was prepared from exactly `records` (the same objects, in order)."""
        return len(records) == len(self.records) and all(
            a is b for a, b in zip(records, self.records, strict=True)
        )


def decode_records(
    records: Sequence[SourceRecord], limit: int, stages: StageClock | None
) -> list[AtomEvent | InvalidAtom]:
    """Each record's event, or the `InvalidAtom` that decoding it raised (`limit`: the
    largest value accepted, `[limits] max_event_bytes`)."""
    decoded: list[AtomEvent | InvalidAtom] = []
    for record in records:
        try:
            with cpu(stages, "decode"):
                decoded.append(decode_atom(record.key, record.value, max_event_bytes=limit))
        except InvalidAtom as exc:
            decoded.append(exc)
    return decoded


def distinct_texts(
    events: Mapping[int, AtomEvent], dead: set[int] | frozenset[int] = frozenset()
) -> dict[str, list[int]]:
    """Each distinct text of the creates among `events` (window position -> event) not in
    `dead`, with the positions that carry it, in window order."""
    positions_of: dict[str, list[int]] = defaultdict(list)
    for position, event in events.items():
        if isinstance(event, AtomCreated) and position not in dead:
            positions_of[event.text].append(position)
    return positions_of


async def prepare_window(
    records: Sequence[SourceRecord],
    embedders: Sequence[Embedder],
    inference: Inference,
    *,
    max_event_bytes: int,
    stages: StageClock | None,
) -> PreparedWindow:
    """Decode `records` and tokenize their texts once for each tokenizer of `embedders`."""
    decoded = decode_records(records, max_event_bytes, stages)
    events = {i: e for i, e in enumerate(decoded) if not isinstance(e, InvalidAtom)}
    texts = list(distinct_texts(events))
    tokens: dict[str, Tokenized] = {}
    for embedder in embedders:
        if embedder.tokenization_key not in tokens:
            tokens[embedder.tokenization_key] = await inference.tokenize(embedder, texts)
    return PreparedWindow(records=records, decoded=decoded, texts=texts, tokens=tokens)
