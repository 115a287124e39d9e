"""The processor: live path, backfill, control plane, metrics, and the wiring of them."""
