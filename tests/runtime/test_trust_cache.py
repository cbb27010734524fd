"""oscar_io.localstore.TrustCache: the certificate and CRL cache the consumer and the proxy share.
No process: the file is read back, merged across two holders, bound to its role."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from oscar import cbor
from oscar_io.errors import StateError
from oscar_io.localstore import CachedCertificate, CachedCrl, TrustCache
from oscar_io.statefiles import SealedFile, private_dir

KEY = bytes(range(32))
KID_A, KID_B = b"A" * 8, b"B" * 8


def test_in_memory_nothing_is_written(tmp_path: Path) -> None:
    cache = TrustCache(None, KEY, "consumer")
    cache.put_certificate(KID_A, b"der", 100)
    cache.put_crl(b"crl", 50)
    assert cache.certificate(KID_A, 100) == b"der" and cache.certificate(KID_A, 101) is None
    assert cache.crl == CachedCrl(b"crl", 50)
    assert list(tmp_path.iterdir()) == []


def test_what_is_put_is_read_back_by_the_next_run(tmp_path: Path) -> None:
    directory = private_dir(tmp_path / "state")
    cache = TrustCache(directory, KEY, "proxy")
    cache.put_certificate(KID_A, b"der-a", 100)
    cache.put_crl(b"crl", 50)
    again = TrustCache(directory, KEY, "proxy")
    assert again.certificates == {KID_A: CachedCertificate(b"der-a", 100)}
    assert again.crl == CachedCrl(b"crl", 50)
    assert oct((directory / "trust").stat().st_mode & 0o777) == "0o600"
    # the layout the consumer and the proxy have always written
    doc = SealedFile(directory / "trust", KEY, "proxy trust").load()
    assert doc == {"certs": [[KID_A, b"der-a", 100]], "crl": [b"crl", 50]}


def test_two_holders_of_one_directory_merge(tmp_path: Path) -> None:
    directory = private_dir(tmp_path / "state")
    mine, theirs = TrustCache(directory, KEY, "consumer"), TrustCache(directory, KEY, "consumer")
    theirs.put_certificate(KID_B, b"der-b", 200)
    theirs.put_crl(b"newer", 90)
    mine.put_certificate(KID_A, b"der-a", 100)  # merges theirs before saving
    mine.put_crl(b"older", 60)  # the later next_update stays
    final = TrustCache(directory, KEY, "consumer")
    assert set(final.certificates) == {KID_A, KID_B}
    assert final.crl == CachedCrl(b"newer", 90)


def test_a_file_is_bound_to_its_role_and_key(tmp_path: Path) -> None:
    directory = private_dir(tmp_path / "state")
    TrustCache(directory, KEY, "consumer").put_certificate(KID_A, b"der", 100)
    with pytest.raises(StateError, match="fails authentication"):
        TrustCache(directory, KEY, "proxy")
    with pytest.raises(StateError, match="fails authentication"):
        TrustCache(directory, os.urandom(32), "consumer")


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"certs": []},
        {"certs": [[b"short", b"der", 1]], "crl": None},
        {"certs": [[KID_A, "text", 1]], "crl": None},
        {"certs": [[KID_A, b"der", -1]], "crl": None},
        {"certs": [], "crl": ["text", 1]},
        {"certs": [], "crl": [b"der", True]},
    ],
)
def test_malformed_content_is_a_state_error(tmp_path: Path, doc: object) -> None:
    directory = private_dir(tmp_path / "state")
    SealedFile(directory / "trust", KEY, "consumer trust").save(doc)
    with pytest.raises(StateError, match="malformed"):
        TrustCache(directory, KEY, "consumer")
    assert cbor.dumps(doc)  # the file itself was fine CBOR
