"""On-disk state of the processor: the key store behind the skip rule and its keys pass."""
