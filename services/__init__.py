"""Entry points of the remote-mvc services: thin wiring around the library."""
