"""The OSCAR runtime: the I/O every role and the operator tool share, on top of the pure core.

Layers (docs/ARCHITECTURE.md)::

    demo  bench  fuzz  tests                      may import anything
    authz_server  producer  consumer  proxy       the roles: each imports oscar and oscar_io only
    oscar_io                                      this package: files, sockets, DTLS, the CLI kit
    oscar                                         the pure core: no I/O, no clock, no asyncio

Modules:

- :mod:`~oscar_io.bundle`: the credentials bundle; :mod:`~oscar_io.statefiles`: state directories
  and files (atomic, exclusive, never through a symbolic link), :mod:`~oscar_io.sealing`: the one
  at-rest encryption recipe;
- :mod:`~oscar_io.asclient` and :mod:`~oscar_io.aswire`: the AS client and the AS wire schema (the
  AS builds its replies with the same records);
- :mod:`~oscar_io.dtls` (server side: credentials index, connection guard, cookie gate in
  :mod:`~oscar_io.dtls_cookie`), :mod:`~oscar_io.dtls_client`, :mod:`~oscar_io.aiocoap_fixes`:
  the DTLS and aiocoap glue; :mod:`~oscar_io.ports`, :mod:`~oscar_io.peers`, :mod:`~oscar_io.tasks`;
- :mod:`~oscar_io.coaperrors`: the one map of aiocoap's exceptions to OSCAR's transport errors;
- :mod:`~oscar_io.coaptcp`: CoAP over TCP and TLS (RFC 8323, BERT, mutual TLS under the AS CA),
  :mod:`~oscar_io.tcproute`: when to take TCP and the fall-back to UDP,
  :mod:`~oscar_io.tlscert`: a TLS certificate from the AS for a key made at start;
- :mod:`~oscar_io.trust`: producer certificates and revocation, checked against the AS CA, with
  its sealed cache in :mod:`~oscar_io.localstore` (shared by the consumer and the proxy);
- :mod:`~oscar_io.clikit`: the command-line kit of every program; :mod:`~oscar_io.tool`: the
  ``oscar`` operator tool (its file handling in :mod:`~oscar_io.tool_files`, the ``inspect``
  rendering in :mod:`~oscar_io.tool_inspect`).

Exceptions: one tree, drawn in :mod:`oscar_io.errors`.
"""
