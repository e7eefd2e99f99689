"""Integrations with training frameworks, each imported on demand."""
