"""The pure core: routing, batching, output records, dead letters, window decisions.

Nothing here does I/O or imports aiokafka, anyio, torch or transformers (a unit test holds
it to that); time is always a parameter.
"""
