"""Session resumption (qsftp.tickets) and the trust a ticket carries.

The unit tests check the stores and the policy without sockets; the loopback tests run real
servers and prove the rules end to end: a second connection resumes, a ticket never replaces
the certificate check for a server the policy does not accept, and a ticket from an insecure
connection is never kept. Every upload is checked by SHA-256 whichever handshake it followed.
"""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

import pytest
from aioquic.tls import CipherSuite, SessionTicket
from helpers import (
    isolated_home,  # noqa: F401 (an autouse fixture)
    make_file,
    run,
    sha256,
)

import qsftp
from qsftp import trust
from qsftp.errors import TrustError
from qsftp.tickets import (
    Ticket,
    TicketCache,
    TicketSink,
    TicketStore,
    check_resumed,
    default_ticket_file,
    policy_refusal,
)

FP_A = "ab" * 32
FP_B = "cd" * 32
HOST, PORT = "127.0.0.1", 5000


def _session_ticket(
    label: bytes = b"t1", *, lifetime: datetime.timedelta = datetime.timedelta(hours=1)
) -> SessionTicket:
    now = datetime.datetime.now(datetime.UTC)
    return SessionTicket(
        age_add=7,
        cipher_suite=CipherSuite.AES_128_GCM_SHA256,
        not_valid_after=now + lifetime,
        not_valid_before=now - datetime.timedelta(seconds=1),
        resumption_secret=b"\x01" * 32,
        server_name=HOST,
        ticket=label,
        max_early_data_size=0xFFFFFFFF,
        other_extensions=[(0x39, b"\x00\x01")],
    )


def _ticket(
    fingerprint: str = FP_A,
    *,
    verified_by: str = "pin",
    cafile_sha256: str = "",
    host_key: str = f"{HOST}:{PORT}",
    session_ticket: SessionTicket | None = None,
) -> Ticket:
    return Ticket(
        host_key=host_key,
        fingerprint=fingerprint,
        verified_by=verified_by,
        cafile_sha256=cafile_sha256,
        session_ticket=session_ticket or _session_ticket(),
    )


# --- the server's store -----------------------------------------------------------------------


def test_server_store_hands_out_each_ticket_once() -> None:
    store = TicketStore()
    ticket = _session_ticket(b"once")
    store.add(ticket)
    assert store.pop(b"once") is ticket
    assert store.pop(b"once") is None, "a ticket resumes one connection only (no replay)"
    assert store.pop(b"never issued") is None
    assert (store.issued, store.resumed) == (1, 1)


def test_server_store_forgets_tickets_after_its_lifetime() -> None:
    now = [datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)]
    store = TicketStore(lifetime=60.0, clock=lambda: now[0])
    store.add(_session_ticket(b"old", lifetime=datetime.timedelta(days=3650)))
    now[0] += datetime.timedelta(seconds=61)
    assert store.pop(b"old") is None


def test_server_store_is_bounded_and_drops_the_oldest() -> None:
    store = TicketStore(max_tickets=3)
    for index in range(5):
        store.add(_session_ticket(bytes([index])))
    assert len(store) == 3
    assert store.pop(bytes([0])) is None
    assert store.pop(bytes([4])) is not None


# --- the client's cache -----------------------------------------------------------------------


def test_cache_keeps_the_newest_ticket_per_server() -> None:
    cache = TicketCache()
    cache.put(_ticket(session_ticket=_session_ticket(b"first")))
    cache.put(_ticket(session_ticket=_session_ticket(b"second")))
    cache.put(_ticket(host_key="[::1]:5000"))
    got = cache.get(HOST, PORT)
    assert got is not None and got.session_ticket.ticket == b"second"
    assert cache.get("::1", 5000) is not None
    assert len(cache) == 2


def test_cache_drops_expired_tickets() -> None:
    cache = TicketCache()
    cache.put(_ticket(session_ticket=_session_ticket(lifetime=datetime.timedelta(seconds=-1))))
    assert cache.get(HOST, PORT) is None


def test_persisted_cache_is_private_and_reads_back_equal(tmp_path: Path) -> None:
    path = tmp_path / "private" / "tickets.json"
    ticket = _ticket(verified_by="cafile", cafile_sha256="ef" * 32)
    TicketCache(path).put(ticket)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = TicketCache(path).get(HOST, PORT)
    assert again == ticket
    assert "resumption" not in repr(again) and "0101" not in repr(again)


def test_persisted_cache_readable_by_others_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "tickets.json"
    TicketCache(path).put(_ticket())
    os.chmod(path, 0o644)
    assert TicketCache(path).get(HOST, PORT) is None


def test_unreadable_cache_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "tickets.json"
    path.write_text("{not json")
    os.chmod(path, 0o600)
    assert len(TicketCache(path)) == 0


def test_default_ticket_file_lives_in_the_state_dir(tmp_path: Path) -> None:
    assert default_ticket_file() == tmp_path / "state" / "session-tickets.json"


# --- the policy -------------------------------------------------------------------------------


def _refusal(ticket: Ticket, known: trust.KnownHosts, **policy: str | None) -> str | None:
    options: dict[str, str | None] = {"pin": None, "cafile_sha256": None, **policy}
    return policy_refusal(
        ticket,
        HOST,
        PORT,
        pin=options["pin"],
        known_hosts=known,
        cafile_sha256=options["cafile_sha256"],
    )


def test_policy_a_pin_must_equal_the_stored_fingerprint(tmp_path: Path) -> None:
    known = trust.KnownHosts(tmp_path / "known_hosts")
    assert _refusal(_ticket(FP_A), known, pin=FP_A) is None
    assert _refusal(_ticket(FP_A), known, pin=FP_B) is not None


def test_policy_known_hosts_must_hold_the_stored_fingerprint(tmp_path: Path) -> None:
    known = trust.KnownHosts(tmp_path / "known_hosts")
    ticket = _ticket(FP_A, verified_by="first-use")
    assert _refusal(ticket, known) is not None, "no entry: the full handshake records it"
    known.add(HOST, PORT, FP_B)
    assert _refusal(ticket, known) is not None
    known.add(HOST, PORT, FP_A, replace=True)
    assert _refusal(ticket, known) is None


def test_policy_a_ca_file_must_be_the_one_that_verified_the_server(tmp_path: Path) -> None:
    known = trust.KnownHosts(tmp_path / "known_hosts")
    by_ca = _ticket(verified_by="cafile", cafile_sha256="11" * 32)
    assert _refusal(by_ca, known, cafile_sha256="11" * 32) is None
    assert _refusal(by_ca, known, cafile_sha256="22" * 32) is not None
    assert _refusal(_ticket(verified_by="pin"), known, cafile_sha256="11" * 32) is not None


def test_policy_a_ticket_is_for_one_address_only(tmp_path: Path) -> None:
    known = trust.KnownHosts(tmp_path / "known_hosts")
    assert _refusal(_ticket(host_key="127.0.0.1:5001"), known, pin=FP_A) is not None


def test_resumed_check_raises_when_the_policy_refuses(tmp_path: Path) -> None:
    known = trust.KnownHosts(tmp_path / "known_hosts")
    with pytest.raises(TrustError):
        check_resumed(_ticket(FP_A), HOST, PORT, pin=FP_B, known_hosts=known, cafile_sha256=None)
    decision = check_resumed(
        _ticket(FP_A), HOST, PORT, pin=FP_A, known_hosts=known, cafile_sha256=None
    )
    assert (decision.fingerprint, decision.how) == (FP_A, "pin")


def test_sink_holds_tickets_until_the_server_is_trusted() -> None:
    cache = TicketCache()
    sink = TicketSink(HOST, PORT, cache, cafile_sha256=None)
    sink.received(_session_ticket(b"early"))
    assert len(cache) == 0 and sink.latest is None
    sink.trusted(trust.TrustDecision(fingerprint=FP_A, how="first-use", message=""))
    kept = cache.get(HOST, PORT)
    assert kept is not None and kept.fingerprint == FP_A and kept.verified_by == "first-use"
    sink.received(_session_ticket(b"later"))
    assert sink.latest is not None and sink.latest.session_ticket.ticket == b"later"


def test_sink_never_keeps_tickets_of_an_insecure_connection() -> None:
    cache = TicketCache()
    sink = TicketSink(HOST, PORT, cache, cafile_sha256=None)
    sink.received(_session_ticket(b"early"))
    sink.trusted(trust.TrustDecision(fingerprint=FP_A, how="insecure", message=""))
    sink.received(_session_ticket(b"later"))
    assert len(cache) == 0 and sink.latest is None


# --- over loopback ----------------------------------------------------------------------------


def test_second_connection_resumes_and_uploads_stay_verified(tmp_path: Path) -> None:
    local = make_file(tmp_path / "f.bin", 200_000)
    root = tmp_path / "root"

    async def body() -> list[tuple[bool, str, str]]:
        cache = TicketCache()
        seen = []
        async with qsftp.serve(root) as server:
            for index in range(3):
                async with qsftp.connect(server.host, server.port, tickets=cache) as conn:
                    result = await conn.upload(local, f"f{index}.bin")
                    assert result.verified and result.sha256 == sha256(local)
                    seen.append((conn.session_resumed, conn.trust.how, conn.fingerprint))
            assert server.tickets is not None and server.tickets.resumed == 2
            assert seen[0][2] == server.fingerprint
        return seen

    seen = run(body)
    assert [resumed for resumed, _, _ in seen] == [False, True, True]
    assert [how for _, how, _ in seen] == ["first-use", "known-host", "known-host"]
    assert len({fp for _, _, fp in seen}) == 1
    for index in range(3):
        assert sha256(root / f"f{index}.bin") == sha256(local)


def test_explicit_session_ticket_resumes_with_a_pin(tmp_path: Path) -> None:
    async def body() -> tuple[bool, bool, str]:
        async with qsftp.serve(tmp_path / "root") as server:
            async with qsftp.connect(server.host, server.port, pin=server.fingerprint) as first:
                await first.listdir()
                ticket = first.session_ticket
            assert ticket is not None and ticket.fingerprint == server.fingerprint
            async with qsftp.connect(
                server.host, server.port, pin=server.fingerprint, session_ticket=ticket
            ) as second:
                return first.session_resumed, second.session_resumed, second.trust.how

    assert run(body) == (False, True, "pin")


def test_restarted_server_ignores_the_ticket_and_the_certificate_is_checked(
    tmp_path: Path,
) -> None:
    """Another server instance (another ticket store) cannot resume: full handshake."""
    local = make_file(tmp_path / "f.bin", 50_000)
    state = tmp_path / "server-state"

    async def body() -> tuple[bool, str, bool]:
        cache = TicketCache()
        async with qsftp.serve(tmp_path / "root", state_dir=state) as server:
            port = server.port
            async with qsftp.connect(server.host, port, tickets=cache):
                pass
        assert cache.get(HOST, port) is not None
        async with (
            qsftp.serve(tmp_path / "root", port=port, state_dir=state) as again,
            qsftp.connect(again.host, port, tickets=cache) as conn,
        ):
            result = await conn.upload(local)
            return conn.session_resumed, conn.trust.how, result.verified

    assert run(body) == (False, "known-host", True)


def test_pin_mismatch_is_refused_even_with_a_stored_ticket(tmp_path: Path) -> None:
    async def body() -> None:
        cache = TicketCache()
        async with qsftp.serve(tmp_path / "root") as server:
            async with qsftp.connect(server.host, server.port, tickets=cache):
                pass
            assert cache.get(server.host, server.port) is not None
            with pytest.raises(TrustError, match="pin"):
                async with qsftp.connect(server.host, server.port, tickets=cache, pin=FP_B):
                    pass

    run(body)


def test_changed_known_hosts_entry_is_not_bypassed_by_a_ticket(tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"

    async def body() -> None:
        cache = TicketCache()
        async with qsftp.serve(tmp_path / "root") as server:
            async with qsftp.connect(server.host, server.port, tickets=cache, known_hosts=known):
                pass
            trust.KnownHosts(known).add(server.host, server.port, FP_B, replace=True)
            with pytest.raises(TrustError, match="CHANGED"):
                async with qsftp.connect(
                    server.host, server.port, tickets=cache, known_hosts=known
                ):
                    pass

    run(body)


def test_insecure_connection_tickets_never_make_a_later_one_verified(tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"

    async def body() -> tuple[int, bool, str]:
        cache = TicketCache()
        async with qsftp.serve(tmp_path / "root") as server:
            async with qsftp.connect(server.host, server.port, tickets=cache, insecure=True) as c:
                await c.listdir()
                assert c.session_ticket is None
            kept = len(cache)
            async with qsftp.connect(
                server.host, server.port, tickets=cache, known_hosts=known
            ) as conn:
                return kept, conn.session_resumed, conn.trust.how

    assert run(body) == (0, False, "first-use")


def test_ca_file_resumption_and_a_persisted_cache(tmp_path: Path) -> None:
    state = tmp_path / "server-state"
    certfile, _ = trust.ensure_self_signed(state)
    path = tmp_path / "tickets.json"

    async def body() -> tuple[int, list[tuple[bool, str]]]:
        seen = []
        async with qsftp.serve(tmp_path / "root", state_dir=state) as server:
            for _ in range(2):  # a new cache object each time: only the file carries the ticket
                async with qsftp.connect(
                    "localhost", server.port, cafile=certfile, tickets=TicketCache(path)
                ) as conn:
                    seen.append((conn.session_resumed, conn.trust.how))
            return server.port, seen

    port, seen = run(body)
    assert seen == [(False, "cafile"), (True, "cafile")]
    stored = TicketCache(path).get("localhost", port)
    assert stored is not None and stored.verified_by == "cafile" and stored.cafile_sha256


def test_insecure_connection_neither_offers_nor_spends_a_verified_ticket(tmp_path: Path) -> None:
    async def body() -> tuple[bool, bool]:
        cache = TicketCache()
        async with qsftp.serve(tmp_path / "root") as server:
            async with qsftp.connect(
                server.host, server.port, tickets=cache, pin=server.fingerprint
            ):
                pass
            async with qsftp.connect(
                server.host, server.port, tickets=cache, insecure=True
            ) as insecure:
                pass
            async with qsftp.connect(
                server.host, server.port, tickets=cache, pin=server.fingerprint
            ) as verified:
                return insecure.session_resumed, verified.session_resumed

    assert run(body) == (False, True)
