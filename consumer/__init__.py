"""OSCAR consumer: fetches protected representations from producers or proxies, verifies and
decrypts them; a library API and a CLI.

Not implemented yet: see the issue tracker.
"""
