"""The OpenAI-compatible HTTP layer: wire models (protocol), request/response conversion (convert), the FastAPI
app (server), Prometheus metrics and audio encoding. No ray import."""
