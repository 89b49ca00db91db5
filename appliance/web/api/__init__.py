"""The API routes with API keys: the native images API and the OpenAI-compatible one."""
