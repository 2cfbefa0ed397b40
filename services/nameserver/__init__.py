"""The nameserver service."""
