"""The one package that reaches into Pyro5's internals.

Everything remote-mvc needs of Pyro5 beyond its public API lives here, so that
a Pyro5 upgrade is checked in one place (tests/unit/test_pyro_internals.py has
one test per internal relied on):

* :mod:`.setup` – the explicit, idempotent process-wide configuration
  (``remote_mvc.setup()``), TLS and its context caches;
* :mod:`.hardening` – the ``marshal`` refusal and bounded inflation setup() installs;
* :mod:`.wire` – the message header: parsed and checked before a payload is read;
* :mod:`.daemons` – the guarded, authenticated daemons (the handshake taken over);
* :mod:`.notify` – both ends of the ``notify`` protocol between the fan-out and a viewer daemon;
* :mod:`.proxy` – connecting a viewer for the fan-out and handing its socket over;
* :mod:`.naming` – the name server's proxy.

Other modules use Pyro5's public API only (``Pyro5.api.Proxy``/``Daemon``/``expose``,
``Pyro5.errors``); tests/unit/test_layering.py checks that.
"""
