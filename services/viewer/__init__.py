"""The viewer service."""
