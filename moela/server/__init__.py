"""The OpenAI-compatible server behind `moela serve` (see moela/server/cli.py).

    app.py          FastAPI app: routes, error bodies, the worker's lifetime
    worker.py       EngineWorker: the engine's own thread, bridged to asyncio
    protocol.py     request models, ApiError, -> SamplingParams
    completions.py  POST /v1/completions        chat.py  POST /v1/chat/completions
    endpoints.py    what both share: the request/stream skeleton, SSE, usage, logprobs, disconnects, worker errors
    middleware.py   API key, content type, body size      metrics.py  Prometheus
    reasoning.py    <think> -> reasoning_content
"""
