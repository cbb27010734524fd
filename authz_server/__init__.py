"""The OSCAR Authorization Server (AS): devices, certificates, resources, access secrets, audit.

A long-running asyncio process serving CoAP over DTLS-PSK only (``oscar-as serve``), and an admin
command line on the same state directory (``oscar-as init | enroll | grant | revoke | rotate |
compromise | devices | resources | grants | audit``). Modules: :mod:`.server` (the process and the
aiocoap site), :mod:`.api` (endpoint logic and request parsing), :mod:`.dtls` (what aiocoap's DTLS
server lacks), :mod:`.ratelimit`, :mod:`.store` (SQLite), :mod:`.vault` (encryption at rest),
:mod:`.ca` (the certificate authority), :mod:`.cli` (``oscar-as``).
"""
