"""Session resumption: TLS 1.3 session tickets, and the server identity they stand for.

A QSFTP server hands every client a session ticket after the handshake (aioquic's
NewSessionTicket, sent once the client's Finished arrives). A client that presents it on a
later connection resumes the session: the TLS handshake uses the ticket's pre-shared key
(with a fresh ECDHE exchange, ``psk_dhe_ke``, so forward secrecy is kept) instead of the
server's certificate and signature. It still takes one round trip — there is no 0-RTT data,
because the client sends nothing before the handshake completes — but skips the certificate
bytes and the signature work on both sides.

The catch is trust: a resumed handshake carries **no certificate**, so :func:`qsftp.trust.
check_peer` has nothing to check. What the client knows is that the peer holds the key of a
session it established earlier. So a ticket is only kept when it arrives on a connection whose
server was verified (by pin, known hosts, first use or CA file — never ``insecure``), and it is
kept *together with* that server's certificate fingerprint and address (:class:`Ticket`).
Before a ticket is offered again, the stored fingerprint must satisfy the policy of the new
connection (:func:`policy_refusal`): the pin must equal it, the known-hosts entry for the
address must equal it, or — for a CA file — the ticket must come from a connection verified
with a CA file of the same content. A ticket that does not pass is simply not offered, so the
connection does a full handshake and the certificate is checked as usual.

Server side, :class:`TicketStore` keeps the tickets one server issued, in memory only, bounded
in number and age; each is single-use (``pop``), so a ticket cannot be replayed and every
connection gets a fresh one. Another server (or the same one restarted) does not know the
ticket, and the connection falls back to a full handshake. Client side, :class:`TicketCache`
keeps the newest verified ticket per ``host:port``, in memory or in a file of mode 0600.
"""

from __future__ import annotations

import base64
import collections
import datetime
import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aioquic.tls import CipherSuite, SessionTicket

from . import trust
from .errors import LocalFileError, TrustError

__all__ = [
    "MAX_CACHED_TICKETS",
    "MAX_SERVER_TICKETS",
    "TICKET_LIFETIME",
    "Ticket",
    "TicketCache",
    "TicketSink",
    "TicketStore",
    "cafile_digest",
    "check_resumed",
    "default_ticket_file",
    "policy_refusal",
]

logger = logging.getLogger(__name__)

# How long a server honours a ticket it issued, s. aioquic announces 24 h in every ticket and
# the client keeps it that long; the server's copy, which holds the resumption secret, is the
# one that bounds how long a session can be resumed, so it goes sooner: long enough for a
# working day of transfers to one server, short enough that a forgotten secret dies.
TICKET_LIFETIME = 8 * 3600.0
# Tickets one server keeps at most (the oldest go first). One ticket is ~300 bytes of secret
# and identifiers plus Python overhead (~1.5 KB): 4096 cost a few MB, and a peer that floods
# the server with handshakes only pushes out older tickets (their clients do a full handshake).
MAX_SERVER_TICKETS = 4096
# Servers a client cache remembers (the least recently stored go first).
MAX_CACHED_TICKETS = 256
# The persisted cache's file format; another version is ignored (and replaced on write).
_CACHE_FORMAT = 1
_TICKET_FILENAME = "session-tickets.json"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def default_ticket_file() -> Path:
    """``qsftp.trust.state_dir() / "session-tickets.json"``: a persisted client cache."""
    return trust.state_dir() / _TICKET_FILENAME


def cafile_digest(cafile: str | os.PathLike[str]) -> str:
    """SHA-256 of a CA file's content: what a ticket verified by that CA file records."""
    try:
        return hashlib.sha256(Path(cafile).read_bytes()).hexdigest()
    except OSError as exc:
        raise LocalFileError(f"cannot read CA file {cafile}: {exc.strerror}") from exc


# --- server side ------------------------------------------------------------------------------


class TicketStore:
    """The tickets one server issued: aioquic's ``session_ticket_handler`` (:meth:`add`) and
    ``session_ticket_fetcher`` (:meth:`pop`). In memory, at most ``max_tickets``, each valid
    for ``lifetime`` seconds and for one resumption."""

    def __init__(
        self,
        *,
        max_tickets: int = MAX_SERVER_TICKETS,
        lifetime: float = TICKET_LIFETIME,
        clock: Callable[[], datetime.datetime] = _now,
    ) -> None:
        self.max_tickets = max_tickets
        self.lifetime = datetime.timedelta(seconds=lifetime)
        self._clock = clock
        # ticket id -> (expiry, ticket), oldest first
        self._tickets: collections.OrderedDict[bytes, tuple[datetime.datetime, SessionTicket]] = (
            collections.OrderedDict()
        )
        self.issued = 0
        "Tickets handed out so far."
        self.resumed = 0
        "Tickets presented and found valid (resumptions granted)."

    def __len__(self) -> int:
        return len(self._tickets)

    def add(self, ticket: SessionTicket) -> None:
        """Keep a ticket aioquic just issued."""
        now = self._clock()
        self._expire(now)
        while len(self._tickets) >= self.max_tickets:
            self._tickets.popitem(last=False)
        expiry = min(now + self.lifetime, ticket.not_valid_after)
        self._tickets[ticket.ticket] = (expiry, ticket)
        self.issued += 1

    def pop(self, label: bytes) -> SessionTicket | None:
        """The ticket a client presented, removed (single use); None if unknown or expired."""
        entry = self._tickets.pop(label, None)
        if entry is None or entry[0] <= self._clock():
            return None
        self.resumed += 1
        return entry[1]

    def _expire(self, now: datetime.datetime) -> None:
        while self._tickets:
            expiry, _ = next(iter(self._tickets.values()))
            if expiry > now:
                break
            self._tickets.popitem(last=False)


# --- client side ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Ticket:
    """A session ticket and the server identity that was verified when it was received."""

    host_key: str
    "The server's address as known hosts stores it, ``host:port`` (``[::1]:5000``)."
    fingerprint: str
    "SHA-256 of the certificate the server presented (or that an earlier ticket stood for)."
    verified_by: str
    "How that certificate was trusted: ``pin``, ``known-host``, ``first-use`` or ``cafile``."
    cafile_sha256: str
    "SHA-256 of the CA file that verified it (empty unless a CA file was used)."
    session_ticket: SessionTicket
    "aioquic's ticket: the resumption secret and the server's ticket id."

    def __repr__(self) -> str:  # never show the resumption secret
        return (
            f"Ticket(host_key={self.host_key!r}, fingerprint={self.fingerprint[:16]}…, "
            f"verified_by={self.verified_by!r}, expires={self.expires.isoformat()})"
        )

    @property
    def expires(self) -> datetime.datetime:
        """When the client stops offering it: after the lifetime the server announced, and at
        most :data:`TICKET_LIFETIME` after it was issued (the server forgets it then too)."""
        st = self.session_ticket
        cap = st.not_valid_before + datetime.timedelta(seconds=TICKET_LIFETIME)
        return min(st.not_valid_after, cap)

    @property
    def valid(self) -> bool:
        """True while the ticket has not expired."""
        return self.session_ticket.is_valid and _now() < self.expires

    def as_json(self) -> dict[str, Any]:
        """A JSON-able form (secrets in base64): what a persisted cache stores."""
        st = self.session_ticket
        b64 = base64.b64encode
        return {
            "host_key": self.host_key,
            "fingerprint": self.fingerprint,
            "verified_by": self.verified_by,
            "cafile_sha256": self.cafile_sha256,
            "age_add": st.age_add,
            "cipher_suite": int(st.cipher_suite),
            "not_valid_after": st.not_valid_after.isoformat(),
            "not_valid_before": st.not_valid_before.isoformat(),
            "resumption_secret": b64(st.resumption_secret).decode(),
            "server_name": st.server_name,
            "ticket": b64(st.ticket).decode(),
            "max_early_data_size": st.max_early_data_size,
            "other_extensions": [[t, b64(v).decode()] for t, v in st.other_extensions],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ticket:
        """Inverse of :meth:`as_json`; KeyError, TypeError or ValueError on a bad record."""
        b64 = base64.b64decode
        session_ticket = SessionTicket(
            age_add=int(data["age_add"]),
            cipher_suite=CipherSuite(int(data["cipher_suite"])),
            not_valid_after=datetime.datetime.fromisoformat(data["not_valid_after"]),
            not_valid_before=datetime.datetime.fromisoformat(data["not_valid_before"]),
            resumption_secret=b64(data["resumption_secret"]),
            server_name=str(data["server_name"]),
            ticket=b64(data["ticket"]),
            max_early_data_size=data["max_early_data_size"],
            other_extensions=[(int(t), b64(v)) for t, v in data["other_extensions"]],
        )
        return cls(
            host_key=str(data["host_key"]),
            fingerprint=trust.normalize_fingerprint(str(data["fingerprint"])),
            verified_by=str(data["verified_by"]),
            cafile_sha256=str(data["cafile_sha256"]),
            session_ticket=session_ticket,
        )


class TicketCache:
    """The newest verified ticket per server, for ``connect(..., tickets=cache)``.

    In memory by default. With ``path`` (e.g. :func:`default_ticket_file`) the cache is read
    from and written back to that file, mode 0600 in a 0700 directory, atomically: a ticket
    is a secret that lets its holder resume — and so act as — the server towards this client
    until it expires, so a file readable by anyone else is refused (ignored with a warning).
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, max_entries: int = MAX_CACHED_TICKETS
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.max_entries = max_entries
        self._tickets: collections.OrderedDict[str, Ticket] = collections.OrderedDict()
        if self.path is not None:
            self._load(self.path)

    def __len__(self) -> int:
        return len(self._tickets)

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "memory"
        return f"<TicketCache {where}: {len(self._tickets)} servers>"

    def get(self, host: str, port: int) -> Ticket | None:
        """The ticket kept for ``host:port``, if any and still valid."""
        key = trust._host_key(host, port)
        ticket = self._tickets.get(key)
        if ticket is not None and not ticket.valid:
            self.discard(host, port)
            return None
        return ticket

    def put(self, ticket: Ticket) -> None:
        """Keep ``ticket`` as the one for its server (replacing an older one)."""
        self._tickets.pop(ticket.host_key, None)
        self._tickets[ticket.host_key] = ticket
        while len(self._tickets) > self.max_entries:
            self._tickets.popitem(last=False)
        self._save()

    def discard(self, host: str, port: int) -> bool:
        """Forget the ticket for ``host:port``; True if there was one."""
        if self._tickets.pop(trust._host_key(host, port), None) is None:
            return False
        self._save()
        return True

    def clear(self) -> None:
        """Forget every ticket."""
        self._tickets.clear()
        self._save()

    def _load(self, path: Path) -> None:
        try:
            info = path.stat()
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            raise LocalFileError(f"cannot read ticket cache {path}: {exc}") from exc
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning(
                "ignoring ticket cache %s: other users can access it (mode %o)",
                path,
                stat.S_IMODE(info.st_mode),
            )
            return
        try:
            document = json.loads(text)
            if document.get("format") != _CACHE_FORMAT:
                raise ValueError(f"format {document.get('format')!r}")
            tickets = [Ticket.from_json(entry) for entry in document["tickets"]]
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            logger.warning("ignoring unreadable ticket cache %s: %s", path, exc)
            return
        for ticket in tickets:
            if ticket.valid:
                self._tickets[ticket.host_key] = ticket

    def _save(self) -> None:
        if self.path is None:
            return
        document = {
            "format": _CACHE_FORMAT,
            "tickets": [ticket.as_json() for ticket in self._tickets.values() if ticket.valid],
        }
        trust._atomic_write(self.path, (json.dumps(document, indent=1) + "\n").encode())


# --- trust ------------------------------------------------------------------------------------


def policy_refusal(
    ticket: Ticket,
    host: str,
    port: int,
    *,
    pin: str | None,
    known_hosts: trust.KnownHosts,
    cafile_sha256: str | None,
) -> str | None:
    """Why ``ticket`` may not stand in for the certificate of ``host:port`` under this
    connection's trust policy, or None when it may. No side effects.

    The same order as :func:`qsftp.trust.check_peer`: a pin must equal the stored fingerprint
    (even with a CA file); a CA file must be the one (by content) that verified the server the
    ticket came from; otherwise the known-hosts entry for the address must equal it (no entry:
    refused, so that the full handshake records the server on first use).
    """
    key = trust._host_key(host, port)
    if ticket.host_key != key:
        return f"the ticket is for {ticket.host_key}, not {key}"
    if not ticket.valid:
        return "the ticket has expired"
    if pin is not None:
        if ticket.fingerprint != trust.normalize_fingerprint(pin):
            return "the ticket's server does not match the pin"
        return None
    if cafile_sha256 is not None:
        if ticket.verified_by != "cafile" or ticket.cafile_sha256 != cafile_sha256:
            return "the ticket's server was not verified by this CA file"
        return None
    known = known_hosts.lookup(host, port)
    if known is None:
        return f"{key} is not in {known_hosts.path}"
    if known != ticket.fingerprint:
        return f"the ticket's server does not match the entry for {key} in {known_hosts.path}"
    return None


def check_resumed(
    ticket: Ticket,
    host: str,
    port: int,
    *,
    pin: str | None,
    known_hosts: trust.KnownHosts,
    cafile_sha256: str | None,
) -> trust.TrustDecision:
    """The trust decision for a session resumed with ``ticket``; TrustError if the stored
    identity does not satisfy the policy (the client checks before offering a ticket, so
    this is the second line)."""
    reason = policy_refusal(
        ticket, host, port, pin=pin, known_hosts=known_hosts, cafile_sha256=cafile_sha256
    )
    if reason is not None:
        raise TrustError(f"resumed session with {host}:{port} not trusted: {reason}")
    if pin is not None:
        how = "pin"
    elif cafile_sha256 is not None:
        how = "cafile"
    else:
        how = "known-host"
    return trust.TrustDecision(fingerprint=ticket.fingerprint, how=how, message="")


class TicketSink:
    """Receives the tickets of one client connection (aioquic's ``session_ticket_handler``)
    and keeps them only once the server is trusted.

    A ticket can arrive before the client has finished checking the certificate; it waits
    here until :meth:`trusted`, which stamps it with the verified fingerprint and passes it to
    the cache. Tickets of an ``insecure`` connection are dropped, so they can never make a
    later connection look verified.
    """

    def __init__(
        self, host: str, port: int, cache: TicketCache | None, *, cafile_sha256: str | None
    ) -> None:
        self.host_key = trust._host_key(host, port)
        self.cache = cache
        self.cafile_sha256 = cafile_sha256
        self.latest: Ticket | None = None
        "The newest ticket received on this connection from a trusted server."
        self._pending: SessionTicket | None = None
        self._decision: trust.TrustDecision | None = None

    def received(self, session_ticket: SessionTicket) -> None:
        """aioquic's callback for a NewSessionTicket."""
        if self._decision is None:
            self._pending = session_ticket  # only the newest is worth keeping
        else:
            self._keep(session_ticket)

    def trusted(self, decision: trust.TrustDecision) -> None:
        """The server passed the trust check: keep its tickets from now on."""
        self._decision = decision
        pending, self._pending = self._pending, None
        if pending is not None:
            self._keep(pending)

    def _keep(self, session_ticket: SessionTicket) -> None:
        decision = self._decision
        if decision is None or decision.how == "insecure" or not decision.fingerprint:
            return
        by_cafile = decision.how == "cafile" and self.cafile_sha256 is not None
        ticket = Ticket(
            host_key=self.host_key,
            fingerprint=decision.fingerprint,
            verified_by=decision.how,
            cafile_sha256=self.cafile_sha256 if by_cafile and self.cafile_sha256 else "",
            session_ticket=session_ticket,
        )
        self.latest = ticket
        if self.cache is not None:
            self.cache.put(ticket)
