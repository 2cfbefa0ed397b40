"""Prototypes of proposed library changes, measured by ``python -m bench --proto`` (never imported by the library)."""
