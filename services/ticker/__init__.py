"""The ticker service."""
