"""OSCAR producer: publishes protected resource representations as a CoAP server, sealing each one
once for any number of consumers; must run on small Linux boards.

Not implemented yet: see the issue tracker.
"""
