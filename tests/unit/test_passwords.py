from qvd_gevent.db.passwords import hash_password, is_legacy, legacy_token, verify_password


def test_legacy_token_matches_the_original_seed():
    # The seeded superadmin hash of QVD 4.3 (docs/schema.md#passwords).
    assert legacy_token("superadmin", "qvd1234") == "kxs9c0f0qnWnPdxubiX2KlCpe/fLcvOkeDqnar/NdKc"


def test_legacy_and_scrypt_verify():
    stored = legacy_token("s3cret")
    assert is_legacy(stored)
    assert verify_password("s3cret", stored)
    assert not verify_password("wrong", stored)
    assert not verify_password("s3cret", stored, legacy_salt="other")
    new = hash_password("s3cret")
    assert not is_legacy(new) and new.startswith("$scrypt$")
    assert verify_password("s3cret", new)
    assert not verify_password("s3creT", new)
    assert hash_password("s3cret") != new  # random salt


def test_empty_password_never_matches():
    assert not verify_password("", legacy_token(""))
    assert not verify_password("", hash_password("x"))
    assert not verify_password("x", None)
