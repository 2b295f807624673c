"""Durable adapter artifacts: schema, validation and storage backends (torch-free)."""
