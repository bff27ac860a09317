"""The HTTP server: continuous batching over decode slots, OpenAI's completions API, metrics and
a playground page (engine -> scheduler -> app -> server)."""
