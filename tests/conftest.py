"""Shared test configuration: the remote_mvc testing kit is loaded as a pytest plugin."""
