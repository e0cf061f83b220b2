"""Test doubles for the engine's external services (e.g. a loopback OpenAI-compatible server)."""
