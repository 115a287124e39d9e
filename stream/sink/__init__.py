"""`lattice-embed sink`: one pgvector table per model, kept current from `embeddings.<model>`.

Modules: `rows` (records to changes, pure), `store` (PostgreSQL + pgvector), `runner` (the
consume, apply, commit loop), `cli`.
"""
