"""OSCAR Authorization Server (AS): device registry, CA, ACL, access secrets, key lifecycle and
audit log, served over CoAP with DTLS-PSK.

Not implemented yet: see the issue tracker.
"""
