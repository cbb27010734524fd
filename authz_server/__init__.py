"""The OSCAR Authorization Server (AS): devices, certificates, resources, access secrets, audit.

A long-running asyncio process serving CoAP over DTLS-PSK only (``oscar-as serve``, the one
command line that starts it: systemd, the tests, the demo and the benchmarks), and an admin command
line on the same state directory (``oscar-as init | enroll | grant | revoke | rotate | compromise |
destroy | devices | resources | grants | audit``). It imports only :mod:`oscar` (the core) and
:mod:`oscar_io` (the runtime: DTLS glue, the AS wire schema, the sealing recipe, the CLI kit).

Modules::

    server        the process: options, credentials reload, scheduler, audit retention, serve()
    site          the aiocoap site: identity, rate limit and size checks; /keys observations
    api           the endpoints' routing, authentication and refusals; /cert, /crl, /resources
    api_keys      GET /secret and GET /keys (built with oscar_io.aswire.KeyState)
    api_links     GET /link and GET /links (the proxy link PSKs, ETag)
    messages      requests, replies, the CoAP error tree, strict parsing
    ratelimit     the per-device token bucket
    retention     the audit retention a running AS applies by itself
    ca            the state directory's CA: init_state, certificates, revocation lists
    envelope      the master key file; envelope encryption of stored secrets (oscar_io.sealing)
    store/        the database: Store and its components over one backend (see its docstring)
    cli/          oscar-as: the parser and main, enrolment, keys, audit, serve

Exceptions (each foreign error translated in one place: sqlite3/aiosqlite in
:mod:`.store.sqlite_backend`, asyncpg's and PostgreSQL's in :mod:`.store.postgres_backend`,
cryptography's through :class:`oscar_io.sealing.SealError` in
:mod:`.envelope`, ``CertificateError`` of the core into ``BadRequest`` in :mod:`.api`)::

    Exception
    ├── StoreError            store.schema   the state directory or database is unusable
    │   ├── NoSuchRecord                     no such device, resource, epoch or grant
    │   ├── Conflict                         exists already, or contradicts the state
    │   └── DatabaseError                    a statement failed (locked, I/O, damaged)
    │       └── DatabaseUnavailable          the server unreachable now (5.03, reconnects)
    ├── VaultError            envelope       a stored ciphertext does not open
    ├── MasterKeyError        envelope       the master key file: missing, exposed, wrong size
    ├── Refused               cli.common     the state says no otherwise (a broken audit chain)
    └── ConstructionRenderableError (aiocoap)
        └── ApiError          messages       5.00, and the CoAP error replies (drawn there):
                                             4.00 4.01 4.03 4.04 4.05 4.13 4.15 4.29
    OscarError (oscar.errors)
    └── UsageError            oscar_io.errors  bad usage or input

``oscar-as`` maps them to exit statuses in one place (:func:`authz_server.cli.main`): 1 for
NoSuchRecord, Conflict and Refused (and a port in use for ``serve``), 2 for the others.
"""
