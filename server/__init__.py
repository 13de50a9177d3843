"""The serving side: one frozen base, many adapters, OpenAI-style HTTP."""
