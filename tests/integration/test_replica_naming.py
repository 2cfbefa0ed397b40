"""Cluster mode's naming on a real name server: every replica of a model is found through the
group's metadata, clients take them in turn and pass over one that just failed; a model registered
under its plain name (the single server) resolves as before."""

from remote_mvc.client import group_tag, resolve, resolve_all
from remote_mvc.pyro.naming import locate_ns


def register(stack, name, uri, metadata=None):
    ns = locate_ns(stack.settings, identity="service", secret=stack.service_secret)
    try:
        ns.register(name, uri, metadata=metadata)
    finally:
        ns._pyroRelease()


def test_replicas_are_found_through_the_group_and_taken_in_turn(mvc_stack):
    uris = [f"PYRO:m@127.0.0.1:{port}" for port in (40001, 40002, 40003)]
    for i, uri in enumerate(uris):
        register(mvc_stack, f"m.replica.r{i}", uri, {group_tag("m")})
    register(mvc_stack, "other.replica.x", "PYRO:o@127.0.0.1:40009", {group_tag("other")})
    settings = mvc_stack.settings
    assert [str(u) for u in resolve_all("m", settings)] == uris
    picks = [str(resolve("m", settings)) for _ in range(6)]
    assert sorted(set(picks)) == uris  # in turn: six picks cover all three
    assert {str(resolve("m", settings, avoid={uris[0], uris[1]})) for _ in range(5)} == {uris[2]}
    assert str(resolve("m", settings, avoid=set(uris))) in uris  # all avoided: any of them still


def test_a_single_server_resolves_by_its_plain_name(mvc_stack):
    model = mvc_stack.model()
    assert [str(u) for u in resolve_all(mvc_stack.settings.model_name, mvc_stack.settings)] == \
        [str(model.uri(mvc_stack.settings.model_name))]
