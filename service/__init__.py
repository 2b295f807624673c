"""The serving side: HTTP app, batching, adapter registry and the device engine."""
