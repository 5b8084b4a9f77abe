"""serve_app: an OpenAI-compatible LLM server on Ray Serve."""
