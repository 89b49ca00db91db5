"""HTTP: the native API, the OpenAI-compatible endpoint, the console and the probes."""
