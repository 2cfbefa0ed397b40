"""Compatibility alias: the generic client moved to :mod:`remote_mvc.client` (viewers use it too,
not only controllers). Kept so that code importing ``remote_mvc.controller`` keeps working."""

from .client import AuthProxy, ModelClient, client_credentials, connect, group_tag, resolve, resolve_all

__all__ = ["AuthProxy", "connect", "resolve", "resolve_all", "group_tag", "ModelClient", "client_credentials"]
