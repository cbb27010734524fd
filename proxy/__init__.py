"""OSCAR proxy: a CoAP forward/reverse proxy that caches protected representations it can verify but
never open.

Not implemented yet: see the issue tracker.
"""
