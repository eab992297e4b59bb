"""Checks on the L7R's TLS material before `config ssl` stores it (cryptography)."""
import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from .context import AdminError


def read_text(path, what):
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise AdminError(f"{path}: Unable to read {what} file: {exc.strerror}") from None
    if not data.strip():
        raise AdminError(f"{path}: Unable to read {what} file: the file is empty")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise AdminError(f"{path}: the {what} file is not PEM text") from None


def _public_der(public_key):
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def check_pair(key_pem, cert_pem, key_path="key", cert_path="cert", now=None):
    """Raise AdminError unless key and cert parse, match, and the cert is valid now."""
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except TypeError:
        raise AdminError(f"{key_path}: the private key is encrypted; the L7R needs it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise AdminError(f"{key_path}: not a PEM private key ({type(exc).__name__})") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError:
        raise AdminError(f"{cert_path}: not a PEM certificate") from None
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise AdminError(f"{key_path}: the private key does not match the certificate {cert_path}")
    now = now or datetime.datetime.now(datetime.UTC)
    not_after = cert.not_valid_after_utc
    not_before = cert.not_valid_before_utc
    if not_after < now:
        raise AdminError(f"{cert_path}: the certificate expired on {not_after:%Y-%m-%d %H:%M:%S} UTC")
    if not_before > now:
        raise AdminError(f"{cert_path}: the certificate is not valid before {not_before:%Y-%m-%d %H:%M:%S} UTC")
    return cert


def check_ca(pem, path):
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        raise AdminError(f"{path}: not a PEM CA certificate") from None
    if not certs:
        raise AdminError(f"{path}: not a PEM CA certificate")


def check_crl(pem, path):
    try:
        x509.load_pem_x509_crl(pem.encode())
    except ValueError:
        raise AdminError(f"{path}: not a PEM certificate revocation list") from None
