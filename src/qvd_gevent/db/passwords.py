"""users.password: the original's salted SHA-256 tokens, and scrypt for new passwords.

Legacy form (QVD 3.x/4.x): unpadded base64 of SHA-256(salt || password), one salt for
the whole installation (config ``l7r.auth.plugin.default.salt``). New form:
``$scrypt$n=16384,r=8,p=1$<salt b64>$<hash b64>`` with a per-password random salt. A
legacy hash is replaced by the new form after the next successful login.
"""
import base64
import hashlib
import hmac
import secrets

SCRYPT_PREFIX = "$scrypt$"
_N, _R, _P = 2 ** 14, 8, 1


def legacy_token(password, salt="qvd1234"):
    digest = hashlib.sha256((salt + password).encode("utf-8")).digest()
    return base64.b64encode(digest).decode("ascii").rstrip("=")


def _b64(data):
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text):
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password, n=_N, r=_R, p=_P):
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32,
                            maxmem=128 * r * n * 2)
    return f"{SCRYPT_PREFIX}n={n},r={r},p={p}${_b64(salt)}${_b64(digest)}"


def is_legacy(stored):
    return bool(stored) and not stored.startswith(SCRYPT_PREFIX)


def verify_password(password, stored, legacy_salt="qvd1234"):
    """True if password matches stored (either form). Empty passwords never match."""
    if not password or not stored:
        return False
    if stored.startswith(SCRYPT_PREFIX):
        try:
            params, salt, digest = stored[len(SCRYPT_PREFIX):].split("$")
            opts = dict(item.split("=") for item in params.split(","))
            n, r, p = int(opts["n"]), int(opts["r"]), int(opts["p"])
            candidate = hashlib.scrypt(password.encode("utf-8"), salt=_unb64(salt), n=n, r=r, p=p,
                                       dklen=len(_unb64(digest)), maxmem=128 * r * n * 2)
        except (ValueError, KeyError):
            return False
        return hmac.compare_digest(candidate, _unb64(digest))
    return hmac.compare_digest(legacy_token(password, legacy_salt).encode(), stored.encode())
