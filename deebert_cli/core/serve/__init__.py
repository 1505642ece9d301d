"""``deebert serve``: ``batching`` (BatchingServer: one worker thread batches rows across concurrent
requests through the refill engine; no HTTP), ``http`` (the TEI-compatible Starlette app, Prometheus
metrics, uvicorn; the optional [serve] extra) and ``page.html`` (the page served at /). Imports runtime,
model, config and the leaves; never analysis or train."""
