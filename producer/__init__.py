"""OSCAR producer: publishes protected resource representations, sealing each value once for any
number of consumers and caches; small enough for a Raspberry Pi class board.

- :class:`Producer` (:mod:`producer.core`): the embeddable API — ``async with Producer(config) as
  p: p.update("temperature", b"21.5")``;
- :class:`ProducerConfig`, :class:`ResourceSpec`, :class:`PublishTarget`, :func:`load_config`
  (:mod:`producer.config`): resources from code or a TOML file;
- ``oscar-producer`` / ``python -m producer`` (:mod:`producer.cli`).

Importing this package loads neither aiocoap nor the DTLS transport; starting a producer does.
"""

from __future__ import annotations

from .config import ConfigError, ProducerConfig, PublishTarget, ResourceSpec, load_config
from .core import Producer, ProducerError, Published

__all__ = [
    "ConfigError",
    "Producer",
    "ProducerConfig",
    "ProducerError",
    "PublishTarget",
    "Published",
    "ResourceSpec",
    "load_config",
]
