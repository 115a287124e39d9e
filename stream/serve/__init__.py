"""The embeddings API (`lattice-embed serve`, CONTRACT section 10) and the ASGI stack that
also serves the processor's /metrics, /healthz and /readyz.

Modules: `asgi` (uvicorn on the caller's loop), `probes`, `api` (routes), `service`
(routing and models), `batcher`, `metrics`, `server` (`run_serve`), `bench`.
"""
