"""``oscar-demo``: the whole system on loopback, one process per role (see :mod:`demo.cli`)."""
