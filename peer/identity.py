"""A peer's (or requester's) key pair and self-signed certificate.

The broker stores only the public key (``pubKey``, PEM SubjectPublicKeyInfo). TLS needs
a certificate, so each side makes a self-signed one around the same key; the other side
accepts a certificate only if its public key is the one registered at the broker
(see `peer.channel`). The private key is written with mode 0600 and never leaves the
config directory; sandboxed tasks run as another uid and cannot read it.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from peer.errors import PeerError

KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
_PEM_LIMIT = 16 * 1024


class IdentityError(PeerError):
    """A key or certificate is missing, unreadable or does not match."""


def public_key_pem(cert_pem: str | bytes) -> str:
    """The SubjectPublicKeyInfo PEM of a certificate, in the broker's pubKey form.

    Raises:
        IdentityError: not a PEM certificate (or absurdly large).
    """
    raw = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    if len(raw) > _PEM_LIMIT:
        raise IdentityError("certificate larger than 16 KiB")
    try:
        cert = x509.load_pem_x509_certificate(raw)
    except ValueError as exc:
        raise IdentityError(f"not a PEM certificate: {exc}") from None
    return _spki_pem(cert.public_key())


def normalize_public_key(pem: str) -> str:
    """Re-encode a PEM public key canonically, so two encodings of one key compare equal."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise IdentityError(f"not a PEM public key: {exc}") from None
    return _spki_pem(key)


def challenge_message(purpose: str, challenge: str, subject: str) -> bytes:
    """What a key signs to use a broker challenge (``broker_api.challenges.message``)."""
    return f"compute-broker/v1\n{purpose}\n{challenge}\n{subject}".encode()


def fingerprint(pub_pem: str) -> str:
    """Short SHA-256 fingerprint of a public key, for logs."""
    return hashlib.sha256(normalize_public_key(pub_pem).encode()).hexdigest()[:16]


def _spki_pem(key: object) -> str:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@dataclass(frozen=True)
class Identity:
    """Paths of a key pair and its certificate, plus the certificate's text."""

    directory: Path
    cert_pem: str

    @property
    def key_path(self) -> Path:
        return self.directory / KEY_FILE

    @property
    def cert_path(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def public_key(self) -> str:
        """The pubKey to register at the broker."""
        return public_key_pem(self.cert_pem)

    def sign(self, purpose: str, challenge: str, subject: str) -> str:
        """Base64 ECDSA (SHA-256) signature over a broker challenge for ``purpose``."""
        raw = self.key_path.read_bytes()
        key = serialization.load_pem_private_key(raw, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise IdentityError(f"{self.key_path} is not an EC private key")
        signature = key.sign(challenge_message(purpose, challenge, subject), ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(signature).decode()

    @classmethod
    def load(cls, directory: Path) -> Identity:
        """Load an identity made by `create`.

        Raises:
            IdentityError: files missing, or the key readable by others.
        """
        directory = Path(directory)
        key, cert = directory / KEY_FILE, directory / CERT_FILE
        if not key.exists() or not cert.exists():
            raise IdentityError(f"no key pair in {directory}; run `python -m peer init` first")
        if key.stat().st_mode & 0o077:
            raise IdentityError(f"{key} is readable by other users; chmod 600 it")
        return cls(directory, cert.read_text())

    @classmethod
    def create(cls, directory: Path) -> Identity:
        """Make a P-256 key (fast to make, fast handshakes) and a self-signed certificate.

        The key file is created with mode 0600 from the start (never world-readable,
        even briefly), and replaced atomically.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "compute-broker peer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        # Certificate first, then the key: both atomically, so a crash leaves either
        # the old pair or a new certificate whose key `load` reports as missing.
        _write_private(directory / CERT_FILE, cert_pem, mode=0o644)
        _write_private(directory / KEY_FILE, key_pem, mode=0o600)
        return cls(directory, cert_pem.decode())

    @classmethod
    def load_or_create(cls, directory: Path) -> Identity:
        try:
            return cls.load(directory)
        except IdentityError:
            if (Path(directory) / KEY_FILE).exists():
                raise
            return cls.create(directory)


def _write_private(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``path`` atomically through a fresh temporary file created with ``mode``
    (``O_EXCL|O_NOFOLLOW``: never an existing file or a planted symlink)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
