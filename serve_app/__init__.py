"""serve_app: an OpenAI-compatible LLM server on Ray Serve."""

APP_NAME = "serve_app"
