"""
Who a node is on the network: its TLS key and certificate, the SHA-256
fingerprint that names it, and the fingerprints an operator pinned.

A node's identity is the SHA-256 of its certificate in DER form, written
C{sha256:<64 hex digits>}.  On first start a node makes an EC P-256 key and a
self-signed certificate in its state directory (C{node.key}, mode 0600, and
C{node.crt}); they are written atomically and never overwritten, so the
fingerprint stays the same across restarts.  An operator may give a key and
certificate of their own instead.

Nobody checks these certificates against an authority or a host name: a
node is who its fingerprint says, and its knowledge of the cluster secret is
proved over the very TLS connection that presented it (see
L{p2pfiles.auth}).

This module imports nothing else of the package.
"""

import datetime
import hashlib
import os
from typing import Dict, FrozenSet, Iterable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.python.filepath import FilePath

KEY_FILE = "node.key"
CERTIFICATE_FILE = "node.crt"

PREFIX = "sha256:"

# A self-signed certificate is checked by nobody for its dates: make it
# valid long enough never to matter, and a day back against clock skew.
VALIDITY = datetime.timedelta(days=100 * 365)


class IdentityError(Exception):
    """
    A key or certificate cannot be used; the string form says why, in one
    line.
    """


def fingerprintOf(der: bytes) -> str:
    """
    The fingerprint of a certificate given in DER form.
    """
    return PREFIX + hashlib.sha256(der).hexdigest()


def parseFingerprint(text: str) -> str:
    """
    Check a fingerprint as a user writes it (C{sha256:} and 64 hex digits,
    either case, colons between byte pairs allowed) and return its normal
    form; raise L{ValueError} with a one-line reason if it is not one.
    """
    if not text.lower().startswith(PREFIX):
        raise ValueError(f"{text!r} is not a fingerprint: it must start with {PREFIX!r}")
    digits = text[len(PREFIX) :].replace(":", "").lower()
    if len(digits) != 64 or not all(c in "0123456789abcdef" for c in digits):
        raise ValueError(f"{text!r} is not a fingerprint: expected {PREFIX} and 64 hex digits")
    return PREFIX + digits


def validFingerprint(value: str) -> bool:
    """
    True if C{value} is a fingerprint in normal form.
    """
    return (
        len(value) == len(PREFIX) + 64
        and value.startswith(PREFIX)
        and all(c in "0123456789abcdef" for c in value[len(PREFIX) :])
    )


class NodeCertificate:
    """
    A node's private key and certificate (C{cryptography} objects), and the
    fingerprint that names it.
    """

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        if not _belongs(key, certificate):
            raise IdentityError("the private key does not belong to the certificate")
        self.key = key
        self.certificate = certificate
        self.fingerprint = fingerprintOf(certificate.public_bytes(serialization.Encoding.DER))

    @classmethod
    def generate(cls, now: Optional[datetime.datetime] = None) -> "NodeCertificate":
        """
        A new EC P-256 key and a self-signed certificate for it.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(key, _selfSigned(key, now))

    def keyPEM(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def certificatePEM(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def _belongs(key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> bool:
    def spki(public: object) -> bytes:
        return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]

    return spki(key.public_key()) == spki(certificate.public_key())


def _selfSigned(key: ec.EllipticCurvePrivateKey, now: Optional[datetime.datetime] = None) -> x509.Certificate:
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pfiles node")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + VALIDITY)
        .sign(key, hashes.SHA256())
    )


def _read(path: FilePath, what: str) -> bytes:
    try:
        return path.getContent()
    except OSError as e:
        raise IdentityError(f"cannot read {what} {path.path}: {e.strerror or e}") from None


def loadKey(path: FilePath) -> ec.EllipticCurvePrivateKey:
    data = _read(path, "TLS key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        # TypeError: an encrypted key, which needs a password we never ask.
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise IdentityError(f"TLS key {path.path} is not a usable PEM private key: {detail}") from None
    except Exception as e:  # cryptography raises its own types for odd input
        raise IdentityError(f"TLS key {path.path} is not a usable PEM private key: {type(e).__name__}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        # RSA and other keys work with TLS too, but one kind keeps the
        # handshake and its tests simple.
        raise IdentityError(f"TLS key {path.path} is not an elliptic-curve key")
    return key


def loadCertificate(path: FilePath) -> x509.Certificate:
    data = _read(path, "TLS certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except Exception as e:
        raise IdentityError(f"TLS certificate {path.path} is not a usable PEM certificate: {type(e).__name__}") from None


def loadIdentity(certificate: FilePath, key: FilePath) -> NodeCertificate:
    """
    The identity in the given files; L{IdentityError} if they cannot be
    read, are not PEM, or do not belong together.
    """
    loaded = loadCertificate(certificate)
    private = loadKey(key)
    if not _belongs(private, loaded):
        raise IdentityError(f"TLS key {key.path} does not belong to the certificate {certificate.path}")
    return NodeCertificate(private, loaded)


def _writeNew(path: FilePath, data: bytes, mode: int) -> None:
    """
    Write C{data} as the new file C{path} with C{mode}: to a temporary name
    first, fsynced, then linked under the final name, which fails rather
    than replace a file that is there.
    """
    directory = path.parent()
    temporary = directory.child(f".{path.basename()}.{os.getpid()}.tmp")
    fd = os.open(temporary.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temporary.path, path.path)
    finally:
        os.unlink(temporary.path)
    dirfd = os.open(directory.path, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def stateIdentity(state: FilePath, create: bool = True) -> Optional[NodeCertificate]:
    """
    The identity kept in the state directory C{state}.

    If neither file is there, make a new one when C{create} is true (the
    directory too), else return L{None}.  Files that are there are never
    replaced: a key without its certificate gets a certificate made for it
    (a start that stopped between the two writes), and anything unusable is
    an L{IdentityError} for the operator to resolve.
    """
    keyPath = state.child(KEY_FILE)
    certificatePath = state.child(CERTIFICATE_FILE)
    hasKey, hasCertificate = keyPath.exists(), certificatePath.exists()
    if hasKey and hasCertificate:
        return loadIdentity(certificatePath, keyPath)
    if hasCertificate:
        raise IdentityError(
            f"{certificatePath.path} has no key beside it ({keyPath.path}): restore the key, "
            f"or remove the certificate to make a new identity"
        )
    if not create:
        return None
    try:
        state.makedirs(ignoreExistingDirectory=True)
        if hasKey:
            key = loadKey(keyPath)
            identity = NodeCertificate(key, _selfSigned(key))
        else:
            identity = NodeCertificate.generate()
            _writeNew(keyPath, identity.keyPEM(), 0o600)
        _writeNew(certificatePath, identity.certificatePEM(), 0o644)
    except FileExistsError:
        # Another process made them meanwhile: use theirs.
        return loadIdentity(certificatePath, keyPath)
    except OSError as e:
        raise IdentityError(f"cannot write the TLS identity into {state.path}: {e.strerror or e}") from None
    return identity


class Pins:
    """
    The fingerprints an operator pinned: per node id (the cluster file's
    third column, C{--peer ID@HOST:PORT=FINGERPRINT}), or a set that any
    node reached must present (the command line's C{--pin}).

    With C{closed}, a node whose id has no pin is refused too: a cluster
    whose every member is pinned admits no one else, whatever secret they
    hold.
    """

    def __init__(
        self,
        byNode: Optional[Dict[int, str]] = None,
        anyOf: Iterable[str] = (),
        closed: bool = False,
    ) -> None:
        self.byNode: Dict[int, str] = dict(byNode or {})
        self.anyOf: FrozenSet[str] = frozenset(anyOf)
        self.closed = closed

    def __bool__(self) -> bool:
        return bool(self.byNode or self.anyOf or self.closed)

    def problem(self, node: Optional[int], fingerprint: Optional[str]) -> Optional[str]:
        """
        Why a peer that is (or claims to be) node C{node} (L{None} for a
        client) and presented C{fingerprint} must be refused, or L{None}.
        """
        if node is None:
            # Clients carry no certificate; the secret alone admits them.
            return None
        shown = fingerprint or "no certificate"
        pinned = self.byNode.get(node)
        if pinned is not None and fingerprint != pinned:
            return f"node {node} presented {shown}, but {pinned} is pinned for it"
        if pinned is None and self.closed:
            return f"node {node} ({shown}) is not a pinned member of this cluster"
        if self.anyOf and fingerprint not in self.anyOf:
            return f"node {node} presented {shown}, which is not among the pinned " + ", ".join(sorted(self.anyOf))
        return None
