"""Certificates and trust decisions: no sockets, no event loop, no aioquic.

The server presents a certificate it generated itself (:func:`ensure_self_signed`). A client
decides whether to trust it in one of four ways, checked by :func:`check_peer` after the TLS
handshake and before any token is sent:

- ``cafile``: TLS already verified the chain, dates and host name against a CA file (the QUIC
  library does this when the client configuration has ``load_verify_locations``). A
  self-signed server certificate works as its own CA file.
- ``pin``: the SHA-256 fingerprint of the certificate must equal the one given.
- known hosts (trust on first use, like ssh): the first fingerprint seen for ``host:port`` is
  recorded in a file; later connections must present the same one.
- ``insecure``: no check at all (a warning is logged).

Fingerprints are SHA-256 over the certificate's DER encoding. Machines store and compare the
canonical form, 64 lowercase hex digits (``ab12...``); people are shown :func:`format_fingerprint`,
``SHA256:AB:12:...``, the same text ``openssl x509 -noout -fingerprint -sha256`` prints after
``=``. :func:`normalize_fingerprint` accepts either, and openssl's whole output line.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import re
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qsftp.errors import LocalFileError, TrustError, UsageError

__all__ = [
    "KnownHosts",
    "TrustDecision",
    "check_peer",
    "config_dir",
    "default_known_hosts",
    "ensure_self_signed",
    "fingerprint",
    "format_fingerprint",
    "load_certificate",
    "normalize_fingerprint",
    "state_dir",
]

logger = logging.getLogger(__name__)

CERT_FILENAME = "server-cert.pem"
KEY_FILENAME = "server-key.pem"
COMMON_NAME = "qsftp self-signed"
# What a client on the same machine dials; aioquic checks the name or IP against these SANs.
DEFAULT_SAN_NAMES = ("localhost", "127.0.0.1", "::1")
# A generated certificate is for one long-lived server, not a public CA: renewal would break
# every pin and known_hosts entry, so make it last.
CERT_LIFETIME = datetime.timedelta(days=3650)
# Backdate notBefore so a client whose clock runs a little behind still accepts a fresh cert.
CLOCK_SKEW_ALLOWANCE = datetime.timedelta(hours=1)
# Regenerate a certificate this close to expiry rather than serve one that dies mid-run.
RENEW_BEFORE_EXPIRY = datetime.timedelta(days=1)
# Private key, known_hosts and the directories holding them: owner only.
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
# The certificate is public: other users may copy it to use as their CA file.
PUBLIC_FILE_MODE = 0o644

_SHA256_HEX_DIGITS = 64
# Optional leading label: "sha256:", "SHA-256 ", or openssl's "sha256 Fingerprint=".
_FINGERPRINT_PREFIX = re.compile(r"^\s*sha-?256\s*(?:fingerprint)?\s*[:=]?", re.IGNORECASE)
_HEX = re.compile(f"[0-9a-f]{{{_SHA256_HEX_DIGITS}}}")


# -- where things live -------------------------------------------------------------------------


def _xdg_dir(override_var: str, xdg_var: str, fallback: str) -> Path:
    if override := os.environ.get(override_var):
        return Path(override)
    xdg = os.environ.get(xdg_var, "")
    # The XDG spec says relative values are invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "qsftp"
    return Path.home() / fallback / "qsftp"


def state_dir() -> Path:
    """Where the server keeps its generated certificate.

    ``$QSFTP_STATE_DIR``, else ``$XDG_STATE_HOME/qsftp``, else ``~/.local/state/qsftp``.
    """
    return _xdg_dir("QSFTP_STATE_DIR", "XDG_STATE_HOME", ".local/state")


def config_dir() -> Path:
    """``$QSFTP_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/qsftp``, else ``~/.config/qsftp``."""
    return _xdg_dir("QSFTP_CONFIG_DIR", "XDG_CONFIG_HOME", ".config")


def default_known_hosts() -> Path:
    """``$QSFTP_KNOWN_HOSTS``, else ``config_dir() / "known_hosts"``."""
    if override := os.environ.get("QSFTP_KNOWN_HOSTS"):
        return Path(override)
    return config_dir() / "known_hosts"


def _atomic_write(path: Path, data: bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync directory."""
    try:
        path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise LocalFileError(f"cannot write {path}: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise LocalFileError(f"cannot write {path}: {exc}") from exc


# -- certificates ------------------------------------------------------------------------------


def load_certificate(pem_path: Path) -> x509.Certificate:
    """Read the first certificate of a PEM file; LocalFileError if missing or not a certificate."""
    try:
        data = Path(pem_path).read_bytes()
    except OSError as exc:
        raise LocalFileError(f"cannot read certificate {pem_path}: {exc}") from exc
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise LocalFileError(f"{pem_path} is not a PEM certificate: {exc}") from exc


def _san_names(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for raw in (*DEFAULT_SAN_NAMES, socket.gethostname(), *hostnames):
        text = raw.strip().strip("[]").lower()
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(text))
        except ValueError:
            try:
                name = x509.DNSName(text.encode("idna").decode("ascii"))
            except (UnicodeError, ValueError) as exc:
                raise UsageError(f"not a host name or IP address: {raw!r}") from exc
        if name not in names:
            names.append(name)
    return names


def _reusable(certfile: Path, keyfile: Path, wanted: list[x509.GeneralName]) -> bool:
    """True when the pair on disk loads, matches, covers ``wanted`` and is not about to expire."""
    try:
        cert = x509.load_pem_x509_certificate(certfile.read_bytes())
        key = serialization.load_pem_private_key(keyfile.read_bytes(), password=None)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound) as exc:
        logger.info("regenerating the server certificate: %s", exc)
        return False
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != cert.public_key().public_bytes(*raw):
        logger.info("regenerating the server certificate: %s does not match %s", keyfile, certfile)
        return False
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc - now < RENEW_BEFORE_EXPIRY:
        logger.info("regenerating the server certificate: it expires %s", cert.not_valid_after_utc)
        return False
    if missing := [name for name in wanted if name not in sans]:
        logger.info("regenerating the server certificate: it does not name %s", missing)
        return False
    return True


def ensure_self_signed(
    directory: Path | None = None, *, hostnames: Sequence[str] = ()
) -> tuple[Path, Path]:
    """Return ``(certfile, keyfile)``, generating a self-signed pair unless a valid one exists.

    The files are ``server-cert.pem`` and ``server-key.pem`` in ``directory`` (default
    :func:`state_dir`). An existing pair is reused when it loads, the key matches, it names
    every requested host and it is valid for at least another day; otherwise a new EC P-256
    key and a 10-year certificate are written (key mode 0o600, directory 0o700). The
    certificate names localhost, 127.0.0.1, ::1, this machine's host name and ``hostnames``,
    and it is its own trust anchor: a client can pass it as its CA file.
    """
    directory = state_dir() if directory is None else Path(directory)
    certfile, keyfile = directory / CERT_FILENAME, directory / KEY_FILENAME
    wanted = _san_names(hostnames)
    if _reusable(certfile, keyfile, wanted):
        return certfile, keyfile

    # P-256: the cheapest signature for every handshake, and supported by every TLS 1.3 stack.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
        .not_valid_after(now + CERT_LIFETIME)
        .add_extension(x509.SubjectAlternativeName(wanted), critical=False)
        # A self-signed end-entity certificate: OpenSSL (which aioquic uses to verify) accepts
        # it as its own trust anchor without CA:TRUE, and CA:FALSE means that if someone does
        # put it in a CA file, it cannot vouch for any other certificate.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # No ExtendedKeyUsage: qh3's verifier does not take a self-issued certificate that
        # carries a TLS EKU as a trust anchor, so such a certificate could not be its own CA
        # file for a qh3 client. Without the extension any use is allowed (RFC 5280 4.2.1.12).
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    # Key first: a crash between the two writes leaves a mismatched pair, which the next call
    # detects and replaces, never a certificate whose key is gone.
    _atomic_write(
        keyfile,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    _atomic_write(certfile, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_FILE_MODE)
    logger.info(
        "generated a self-signed certificate %s, fingerprint %s",
        certfile,
        format_fingerprint(fingerprint(cert)),
    )
    return certfile, keyfile


# -- fingerprints ------------------------------------------------------------------------------


def fingerprint(cert: x509.Certificate | bytes) -> str:
    """SHA-256 of the certificate's DER encoding (``bytes`` are DER): 64 lowercase hex digits."""
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """Canonical form (64 lowercase hex digits) of a fingerprint typed or pasted by a person.

    Accepts an optional ``sha256:`` / ``SHA256:`` / ``sha256 Fingerprint=`` label, either case,
    and colons or whitespace between the digits. UsageError unless 32 bytes of hex remain.
    """
    digits = re.sub(r"[\s:]", "", _FINGERPRINT_PREFIX.sub("", text, count=1)).lower()
    if not _HEX.fullmatch(digits):
        raise UsageError(
            f"not a SHA-256 fingerprint ({_SHA256_HEX_DIGITS} hex digits expected): {text!r}"
        )
    return digits


def format_fingerprint(fp: str) -> str:
    """Human form ``SHA256:AB:12:...``, comparable with ``openssl x509 -fingerprint -sha256``."""
    digits = normalize_fingerprint(fp).upper()
    return "SHA256:" + ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))


# -- known hosts -------------------------------------------------------------------------------


def _host_key(host: str, port: int) -> str:
    """``host:port`` as stored: lowercase, IP addresses canonical, IPv6 in brackets."""
    name = host.strip().strip("[]").lower()
    if not name or not 0 < port < 65536:
        raise UsageError(f"not a server address: {host!r} port {port!r}")
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return f"{name}:{port}"
    return f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _parse_line(line: str) -> tuple[str, str] | None:
    """``(host_key, fingerprint)`` for an entry line; None for blanks, comments and junk."""
    fields = line.split("#", 1)[0].split()
    if not fields:
        return None
    try:
        address, fp = fields  # ValueError unless exactly two fields
        host, _, port = address.rpartition(":")
        return _host_key(host, int(port)), normalize_fingerprint(fp)
    except (ValueError, UsageError):
        logger.warning("ignoring malformed known_hosts line: %r", line)
        return None


class KnownHosts:
    """ssh-like trust-on-first-use store of server fingerprints.

    One line per server, ``host:port sha256hex`` (``[::1]:5000`` for IPv6, host names in
    lowercase); ``#`` starts a comment. Malformed lines are ignored with a warning and kept.
    The file need not exist until the first :meth:`add`. Every change rewrites the file
    atomically, so readers never see half a file; two clients adding at the same instant can
    still lose one of the two new entries (it is recorded again on the next connection).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path: Path = default_known_hosts() if path is None else Path(path)

    def _lines(self) -> list[str]:
        try:
            return self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise LocalFileError(f"cannot read known hosts file {self.path}: {exc}") from exc

    def _write(self, lines: list[str]) -> None:
        _atomic_write(self.path, "".join(f"{line}\n" for line in lines).encode("utf-8"))

    def lookup(self, host: str, port: int) -> str | None:
        """The recorded fingerprint for ``host:port`` (first entry wins), or None."""
        key = _host_key(host, port)
        for line in self._lines():
            entry = _parse_line(line)
            if entry is not None and entry[0] == key:
                return entry[1]
        return None

    def add(self, host: str, port: int, fp: str, *, replace: bool = False) -> None:
        """Record ``fp`` for ``host:port``, keeping every other line.

        Adding the fingerprint already recorded changes nothing. A different one for the same
        server is a UsageError unless ``replace=True``, which drops the old entries.
        """
        key, fp = _host_key(host, port), normalize_fingerprint(fp)
        lines = self._lines()
        current = [e[1] for e in map(_parse_line, lines) if e is not None and e[0] == key]
        if current == [fp]:
            return
        if current and not replace:
            raise UsageError(
                f"{self.path} already has a different fingerprint for {key}; "
                "pass replace=True to change it"
            )
        kept = [line for line in lines if (e := _parse_line(line)) is None or e[0] != key]
        self._write([*kept, f"{key} {fp}"])

    def remove(self, host: str, port: int) -> bool:
        """Drop every entry for ``host:port``; True if there was one."""
        key = _host_key(host, port)
        lines = self._lines()
        kept = [line for line in lines if (e := _parse_line(line)) is None or e[0] != key]
        if len(kept) == len(lines):
            return False
        self._write(kept)
        return True


# -- the decision ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustDecision:
    """Why the client trusts the server it is connected to."""

    fingerprint: str
    """SHA-256 of the server certificate, 64 lowercase hex digits ("" if none was seen)."""
    how: str
    """"cafile", "pin", "known-host", "first-use" or "insecure"."""
    message: str
    """A line to show the user on first use ("recorded ... in ..."); "" otherwise."""


def check_peer(
    host: str,
    port: int,
    cert: x509.Certificate | bytes | None,
    *,
    pin: str | None = None,
    known_hosts: KnownHosts | None = None,
    insecure: bool = False,
    cafile_verified: bool = False,
) -> TrustDecision:
    """Decide whether to trust the server's certificate; TrustError if not.

    Call it after the TLS handshake and before sending anything secret. In order:
    ``insecure`` trusts anything (with a warning; combining it with ``pin`` is a UsageError);
    a ``pin`` must match, even when a CA file verified the chain too; ``cafile_verified`` means
    TLS already checked chain, dates and name; otherwise the known-hosts file decides, and a
    server seen for the first time is recorded there. ``cert`` is None when the handshake
    carried no certificate (a resumed session): acceptable only for ``insecure``. Not even for
    ``cafile``: TLS verified no chain then, so the server's identity is the one stored with
    the session ticket, which :func:`qsftp.tickets.check_resumed` checks instead.
    """
    fp = "" if cert is None else fingerprint(cert)
    key = _host_key(host, port)
    if insecure:
        if pin is not None:
            raise UsageError("a pin and insecure mode contradict each other; choose one")
        logger.warning("not verifying the certificate of %s (insecure mode)", key)
        return TrustDecision(fingerprint=fp, how="insecure", message="")
    if cert is None:
        raise TrustError(
            f"server {key} presented no certificate, so its fingerprint cannot be checked"
        )
    if pin is not None:
        expected = normalize_fingerprint(pin)
        if fp != expected:
            raise TrustError(
                f"the certificate of server {key} does not match the pin:\n"
                f"  pinned:  {format_fingerprint(expected)}\n"
                f"  offered: {format_fingerprint(fp)}"
            )
        return TrustDecision(fingerprint=fp, how="pin", message="")
    if cafile_verified:
        return TrustDecision(fingerprint=fp, how="cafile", message="")

    store = KnownHosts() if known_hosts is None else known_hosts
    known = store.lookup(host, port)
    if known == fp:
        return TrustDecision(fingerprint=fp, how="known-host", message="")
    if known is None:
        store.add(host, port, fp)
        message = (
            f"qsftp: trusting new server {key}, fingerprint {format_fingerprint(fp)}, "
            f"recorded in {store.path}"
        )
        logger.info("%s", message)
        return TrustDecision(fingerprint=fp, how="first-use", message=message)
    raise TrustError(
        f"the certificate of server {key} has CHANGED since it was recorded in {store.path}.\n"
        f"  recorded: {format_fingerprint(known)}\n"
        f"  offered:  {format_fingerprint(fp)}\n"
        "Someone may be intercepting the connection, or the server got a new certificate.\n"
        f"If the change is expected, remove the line for {key} from {store.path} "
        "(the new certificate is then recorded on the next connection), "
        f"or pass --pin {fp} to trust it for this connection."
    )
