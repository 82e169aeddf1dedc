"""Certificates, fingerprints, known hosts and trust decisions (qsftp.trust).

The loopback tests run real aioquic handshakes to prove what the unit tests assume: the
generated certificate is its own trust anchor, names what clients dial, and a client that
skips verification can still read the certificate to fingerprint it.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import logging
import shutil
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.tls import AlertDescription
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from qsftp import trust
from qsftp.errors import LocalFileError, TrustError, UsageError
from qsftp.trust import (
    KnownHosts,
    check_peer,
    config_dir,
    default_known_hosts,
    ensure_self_signed,
    fingerprint,
    format_fingerprint,
    load_certificate,
    normalize_fingerprint,
    state_dir,
)

# Loopback handshakes take ~10 ms and a refused one ~0.1 s (aioquic's closing period);
# this only keeps a broken test from hanging.
NETWORK_TIMEOUT = 5.0
ALPN = ["qsftp/1"]
# QUIC CRYPTO_ERROR range: 0x100 + TLS alert (RFC 9001 section 4.8).
CRYPTO_ERROR_BAD_CERTIFICATE = 0x100 + AlertDescription.bad_certificate

FP_A = "ab" * 32
FP_B = "cd" * 32


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every default location into tmp_path so no test touches the real home."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in (
        "QSFTP_STATE_DIR",
        "QSFTP_CONFIG_DIR",
        "QSFTP_KNOWN_HOSTS",
        "XDG_STATE_HOME",
        "XDG_CONFIG_HOME",
    ):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="module")
def pair_a(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return ensure_self_signed(tmp_path_factory.mktemp("a"))


@pytest.fixture(scope="module")
def pair_b(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return ensure_self_signed(tmp_path_factory.mktemp("b"))


@pytest.fixture
def cert_a(pair_a: tuple[Path, Path]) -> x509.Certificate:
    return load_certificate(pair_a[0])


@pytest.fixture
def cert_b(pair_b: tuple[Path, Path]) -> x509.Certificate:
    return load_certificate(pair_b[0])


def test_importing_trust_loads_no_asyncio_or_aioquic() -> None:
    code = "import sys, qsftp.trust; print(sorted({'asyncio', 'aioquic'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# -- locations ---------------------------------------------------------------------------------


def test_locations_default_to_the_home_directory(isolated_home: Path) -> None:
    assert state_dir() == isolated_home / ".local/state/qsftp"
    assert config_dir() == isolated_home / ".config/qsftp"
    assert default_known_hosts() == isolated_home / ".config/qsftp/known_hosts"


def test_locations_follow_xdg_but_ignore_relative_xdg_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/config")
    assert state_dir() == tmp_path / "state/qsftp"
    assert config_dir() == isolated_home / ".config/qsftp"


def test_qsftp_variables_override_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("QSFTP_STATE_DIR", str(tmp_path / "s"))
    monkeypatch.setenv("QSFTP_CONFIG_DIR", str(tmp_path / "c"))
    assert state_dir() == tmp_path / "s"
    assert config_dir() == tmp_path / "c"
    assert default_known_hosts() == tmp_path / "c/known_hosts"
    monkeypatch.setenv("QSFTP_KNOWN_HOSTS", str(tmp_path / "kh"))
    assert default_known_hosts() == tmp_path / "kh"


# -- ensure_self_signed ------------------------------------------------------------------------


def test_self_signed_pair_goes_to_the_state_dir_with_private_modes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QSFTP_STATE_DIR", str(tmp_path / "state"))
    certfile, keyfile = ensure_self_signed()
    assert (certfile, keyfile) == (
        tmp_path / "state/server-cert.pem",
        tmp_path / "state/server-key.pem",
    )
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    assert stat.S_IMODE(certfile.stat().st_mode) == 0o644
    assert stat.S_IMODE(certfile.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in certfile.parent.iterdir()) == [  # no temp files left
        "server-cert.pem",
        "server-key.pem",
    ]


def test_self_signed_certificate_names_what_clients_dial(tmp_path: Path) -> None:
    certfile, _ = ensure_self_signed(tmp_path, hostnames=["Files.Example.org", "192.0.2.7"])
    cert = load_certificate(certfile)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = ["localhost", socket.gethostname().lower(), "files.example.org"]
    assert sans.get_values_for_type(x509.DNSName) == list(dict.fromkeys(dns))
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("192.0.2.7"),
    ]
    assert cert.subject.rfc4514_string() == "CN=qsftp self-signed"
    assert cert.issuer == cert.subject
    now = datetime.datetime.now(datetime.UTC)
    assert now - datetime.timedelta(hours=2) < cert.not_valid_before_utc < now
    assert cert.not_valid_after_utc - now > datetime.timedelta(days=3649)


def test_self_signed_pair_is_reused(tmp_path: Path) -> None:
    first = load_certificate(ensure_self_signed(tmp_path)[0])
    second = load_certificate(ensure_self_signed(tmp_path)[0])
    assert fingerprint(first) == fingerprint(second)


def test_self_signed_pair_is_regenerated_when_the_key_is_deleted(tmp_path: Path) -> None:
    certfile, keyfile = ensure_self_signed(tmp_path)
    before = fingerprint(load_certificate(certfile))
    keyfile.unlink()
    ensure_self_signed(tmp_path)
    assert keyfile.exists()
    assert fingerprint(load_certificate(certfile)) != before


def test_self_signed_pair_is_regenerated_when_the_key_does_not_match(
    tmp_path: Path, pair_b: tuple[Path, Path]
) -> None:
    certfile, keyfile = ensure_self_signed(tmp_path)
    before = fingerprint(load_certificate(certfile))
    keyfile.write_bytes(pair_b[1].read_bytes())
    ensure_self_signed(tmp_path)
    cert = load_certificate(certfile)
    key = serialization.load_pem_private_key(keyfile.read_bytes(), password=None)
    assert fingerprint(cert) != before
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def test_self_signed_pair_is_regenerated_for_a_new_hostname(tmp_path: Path) -> None:
    before = fingerprint(load_certificate(ensure_self_signed(tmp_path)[0]))
    certfile, _ = ensure_self_signed(tmp_path, hostnames=["new.example"])
    assert fingerprint(load_certificate(certfile)) != before
    assert fingerprint(load_certificate(ensure_self_signed(tmp_path)[0])) == fingerprint(
        load_certificate(certfile)
    ), "a certificate naming more hosts than asked for is still reused"


def test_self_signed_pair_is_regenerated_near_expiry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trust, "CERT_LIFETIME", datetime.timedelta(hours=12))
    before = fingerprint(load_certificate(ensure_self_signed(tmp_path)[0]))
    monkeypatch.undo()
    assert fingerprint(load_certificate(ensure_self_signed(tmp_path)[0])) != before


def test_self_signed_rejects_a_hostname_that_is_not_one(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        ensure_self_signed(tmp_path, hostnames=["bad..name"])


def test_load_certificate_reports_missing_and_non_certificate_files(
    tmp_path: Path, pair_a: tuple[Path, Path]
) -> None:
    with pytest.raises(LocalFileError, match="cannot read"):
        load_certificate(tmp_path / "missing.pem")
    with pytest.raises(LocalFileError, match="not a PEM certificate"):
        load_certificate(pair_a[1])  # the key file
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"\x00\xff junk")
    with pytest.raises(LocalFileError):
        load_certificate(junk)


# -- fingerprints ------------------------------------------------------------------------------


def test_fingerprint_is_sha256_of_der_in_lowercase_hex(cert_a: x509.Certificate) -> None:
    der = cert_a.public_bytes(serialization.Encoding.DER)
    assert fingerprint(cert_a) == fingerprint(der) == hashlib.sha256(der).hexdigest()
    assert len(fingerprint(cert_a)) == 64


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_format_fingerprint_matches_openssl_output(pair_a: tuple[Path, Path]) -> None:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(pair_a[0])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    fp = fingerprint(load_certificate(pair_a[0]))
    assert out.split("=", 1)[1] == format_fingerprint(fp).removeprefix("SHA256:")
    assert normalize_fingerprint(out) == fp, "openssl's whole line is accepted"


def test_format_fingerprint_round_trips() -> None:
    shown = format_fingerprint(FP_A)
    assert shown == "SHA256:" + ":".join(["AB"] * 32)
    assert normalize_fingerprint(shown) == FP_A


@pytest.mark.parametrize(
    "text",
    [
        FP_A,
        FP_A.upper(),
        "sha256:" + FP_A,
        "SHA-256 " + FP_A,
        ":".join(["AB"] * 32),
        " ".join(["ab"] * 32),
        "  sha256 Fingerprint=" + ":".join(["Ab"] * 32) + "\n",
    ],
)
def test_normalize_fingerprint_accepts_common_spellings(text: str) -> None:
    assert normalize_fingerprint(text) == FP_A


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256:",
        "ab" * 31,
        "ab" * 33,
        "g" + "a" * 63,
        "md5:" + FP_A,
        "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",  # ssh's base64 form
    ],
)
def test_normalize_fingerprint_rejects_junk(text: str) -> None:
    with pytest.raises(UsageError, match="SHA-256 fingerprint"):
        normalize_fingerprint(text)


# -- known hosts -------------------------------------------------------------------------------


def test_known_hosts_file_need_not_exist(tmp_path: Path) -> None:
    store = KnownHosts(tmp_path / "nowhere/known_hosts")
    assert store.lookup("localhost", 5000) is None
    assert store.remove("localhost", 5000) is False
    assert not store.path.exists()


def test_known_hosts_default_path(isolated_home: Path) -> None:
    assert KnownHosts().path == isolated_home / ".config/qsftp/known_hosts"


def test_known_hosts_add_writes_one_line_per_server(tmp_path: Path) -> None:
    store = KnownHosts(tmp_path / "cfg/known_hosts")
    store.add("LocalHost", 5000, format_fingerprint(FP_A))
    store.add("::1", 5000, FP_B)
    store.add("127.0.0.1", 6000, FP_B)
    assert store.path.read_text() == (
        f"localhost:5000 {FP_A}\n[::1]:5000 {FP_B}\n127.0.0.1:6000 {FP_B}\n"
    )
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert store.lookup("localhost", 5000) == FP_A
    assert store.lookup("LOCALHOST", 5000) == FP_A
    assert store.lookup("localhost", 5001) is None


@pytest.mark.parametrize("spelling", ["::1", "[::1]", "0:0:0:0:0:0:0:1", "[0::1]"])
def test_known_hosts_ipv6_keys_are_bracketed_and_canonical(tmp_path: Path, spelling: str) -> None:
    store = KnownHosts(tmp_path / "known_hosts")
    store.add(spelling, 443, FP_A)
    assert store.path.read_text() == f"[::1]:443 {FP_A}\n"
    assert store.lookup("::1", 443) == FP_A


def test_known_hosts_add_refuses_to_change_an_entry_without_replace(tmp_path: Path) -> None:
    store = KnownHosts(tmp_path / "known_hosts")
    store.add("h", 1, FP_A)
    store.add("h", 1, FP_A)  # the same fingerprint again: nothing to do
    with pytest.raises(UsageError, match="replace=True"):
        store.add("h", 1, FP_B)
    assert store.lookup("h", 1) == FP_A
    store.add("h", 1, FP_B, replace=True)
    assert store.lookup("h", 1) == FP_B
    assert store.path.read_text() == f"h:1 {FP_B}\n"


def test_known_hosts_keeps_comments_and_other_lines(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(
        "# my servers\n"
        f"Alpha:22 {FP_A}  # hand-written\n"
        "\n"
        "this line is junk\n"
        f"beta:22 {format_fingerprint(FP_B)}\n"
        f"[::1]:5000 {FP_A}\n"
    )
    store = KnownHosts(path)
    assert store.lookup("alpha", 22) == FP_A
    assert store.lookup("beta", 22) == FP_B
    assert store.lookup("::1", 5000) == FP_A
    store.add("alpha", 22, FP_B, replace=True)
    assert store.remove("beta", 22) is True
    assert store.remove("beta", 22) is False
    assert path.read_text() == (
        f"# my servers\n\nthis line is junk\n[::1]:5000 {FP_A}\nalpha:22 {FP_B}\n"
    )


@pytest.mark.parametrize(("host", "port"), [("", 22), ("h", 0), ("h", 65536)])
def test_known_hosts_rejects_bad_addresses(tmp_path: Path, host: str, port: int) -> None:
    with pytest.raises(UsageError):
        KnownHosts(tmp_path / "known_hosts").lookup(host, port)


def test_known_hosts_unreadable_file_is_a_local_file_error(tmp_path: Path) -> None:
    (tmp_path / "known_hosts").mkdir()
    with pytest.raises(LocalFileError):
        KnownHosts(tmp_path / "known_hosts").lookup("h", 1)


# -- check_peer --------------------------------------------------------------------------------


def test_first_use_records_the_server_and_second_use_knows_it(
    tmp_path: Path, cert_a: x509.Certificate
) -> None:
    store = KnownHosts(tmp_path / "known_hosts")
    first = check_peer("127.0.0.1", 5000, cert_a, known_hosts=store)
    assert first.how == "first-use"
    assert first.fingerprint == fingerprint(cert_a)
    assert first.message == (
        f"qsftp: trusting new server 127.0.0.1:5000, fingerprint "
        f"{format_fingerprint(fingerprint(cert_a))}, recorded in {store.path}"
    )
    assert store.lookup("127.0.0.1", 5000) == fingerprint(cert_a)
    second = check_peer("127.0.0.1", 5000, cert_a, known_hosts=store)
    assert (second.how, second.fingerprint, second.message) == (
        "known-host",
        fingerprint(cert_a),
        "",
    )


def test_changed_certificate_is_refused_naming_both_fingerprints_and_the_file(
    tmp_path: Path, cert_a: x509.Certificate, cert_b: x509.Certificate
) -> None:
    store = KnownHosts(tmp_path / "known_hosts")
    check_peer("::1", 5000, cert_a, known_hosts=store)
    with pytest.raises(TrustError) as info:
        check_peer("::1", 5000, cert_b, known_hosts=store)
    text = str(info.value)
    assert format_fingerprint(fingerprint(cert_a)) in text
    assert format_fingerprint(fingerprint(cert_b)) in text
    assert str(store.path) in text
    assert "[::1]:5000" in text
    assert "--pin" in text
    assert store.lookup("::1", 5000) == fingerprint(cert_a), "the record is not touched"


def test_tofu_uses_the_default_known_hosts_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cert_a: x509.Certificate
) -> None:
    monkeypatch.setenv("QSFTP_KNOWN_HOSTS", str(tmp_path / "kh"))
    assert check_peer("localhost", 1, cert_a).how == "first-use"
    assert KnownHosts(tmp_path / "kh").lookup("localhost", 1) == fingerprint(cert_a)


def test_pin_must_match(tmp_path: Path, cert_a: x509.Certificate, cert_b: x509.Certificate) -> None:
    store = KnownHosts(tmp_path / "known_hosts")
    shown = format_fingerprint(fingerprint(cert_a))
    decision = check_peer("h", 1, cert_a, pin=shown, known_hosts=store)
    assert (decision.how, decision.fingerprint) == ("pin", fingerprint(cert_a))
    with pytest.raises(TrustError) as info:
        check_peer("h", 1, cert_b, pin=shown, known_hosts=store)
    assert shown in str(info.value)
    assert format_fingerprint(fingerprint(cert_b)) in str(info.value)
    assert not store.path.exists(), "a pinned connection does not write known_hosts"


def test_pin_is_checked_even_when_a_cafile_verified_the_chain(
    cert_a: x509.Certificate, cert_b: x509.Certificate
) -> None:
    with pytest.raises(TrustError):
        check_peer("h", 1, cert_b, pin=fingerprint(cert_a), cafile_verified=True)


def test_a_malformed_pin_is_a_usage_error(cert_a: x509.Certificate) -> None:
    with pytest.raises(UsageError):
        check_peer("h", 1, cert_a, pin="not-a-fingerprint")


def test_cafile_verified_trusts_without_known_hosts(
    tmp_path: Path, cert_a: x509.Certificate
) -> None:
    store = KnownHosts(tmp_path / "known_hosts")
    decision = check_peer("h", 1, cert_a, known_hosts=store, cafile_verified=True)
    assert (decision.how, decision.fingerprint, decision.message) == (
        "cafile",
        fingerprint(cert_a),
        "",
    )
    assert not store.path.exists()


def test_insecure_trusts_anything_with_a_warning(
    tmp_path: Path, cert_b: x509.Certificate, caplog: pytest.LogCaptureFixture
) -> None:
    store = KnownHosts(tmp_path / "known_hosts")
    store.add("h", 1, FP_A)
    with caplog.at_level(logging.WARNING, logger="qsftp.trust"):
        decision = check_peer("h", 1, cert_b, known_hosts=store, insecure=True)
    assert (decision.how, decision.fingerprint) == ("insecure", fingerprint(cert_b))
    assert "insecure" in caplog.text
    assert check_peer("h", 1, None, insecure=True).fingerprint == ""
    with pytest.raises(UsageError):
        check_peer("h", 1, cert_b, pin=FP_A, insecure=True)


def test_no_certificate_is_refused_even_with_a_ca_file(tmp_path: Path) -> None:
    """A handshake without a certificate (a resumed session) verified no chain: only the
    identity stored with the session ticket can vouch for it (qsftp.tickets)."""
    store = KnownHosts(tmp_path / "known_hosts")
    with pytest.raises(TrustError, match="no certificate"):
        check_peer("h", 1, None, known_hosts=store)
    with pytest.raises(TrustError, match="no certificate"):
        check_peer("h", 1, None, pin=FP_A)
    with pytest.raises(TrustError, match="no certificate"):
        check_peer("h", 1, None, cafile_verified=True)
    assert not store.path.exists()


# -- real aioquic handshakes over loopback -----------------------------------------------------


class _RecordingProtocol(QuicConnectionProtocol):
    """Keeps the ConnectionTerminated event: wait_connected raises a bare ConnectionError."""

    terminated: events.ConnectionTerminated | None = None

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            self.terminated = event


async def _handshake(
    pair: tuple[Path, Path],
    host: str,
    *,
    cafile: Path | None = None,
    verify_mode: ssl.VerifyMode | None = None,
    server_name: str | None = None,
    seen: list[_RecordingProtocol] | None = None,
) -> x509.Certificate | None:
    """Serve ``pair`` on [::]:0 and connect to ``host``; return the certificate the client saw."""
    server_config = QuicConfiguration(is_client=False, alpn_protocols=ALPN)
    server_config.load_cert_chain(pair[0], pair[1])
    server = await serve("::", 0, configuration=server_config)
    try:
        port = server._transport.get_extra_info("sockname")[1]
        client_config = QuicConfiguration(is_client=True, alpn_protocols=ALPN)
        client_config.server_name = server_name
        if cafile is not None:
            client_config.load_verify_locations(str(cafile))
        if verify_mode is not None:
            client_config.verify_mode = verify_mode

        def create_protocol(*args: Any, **kwargs: Any) -> _RecordingProtocol:
            protocol = _RecordingProtocol(*args, **kwargs)
            if seen is not None:
                seen.append(protocol)
            return protocol

        async def run() -> x509.Certificate | None:
            async with connect(
                host, port, configuration=client_config, create_protocol=create_protocol
            ) as client:
                # aioquic offers no public accessor for the peer certificate (FIELD-NOTES).
                peer: x509.Certificate | None = client._quic.tls._peer_certificate
                return peer

        return await asyncio.wait_for(run(), NETWORK_TIMEOUT)
    finally:
        server.close()


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1"])
def test_generated_certificate_is_its_own_trust_anchor(
    pair_a: tuple[Path, Path], host: str
) -> None:
    """The default client (CERT_REQUIRED, name/IP check) accepts the cert given as its cafile."""
    peer = asyncio.run(_handshake(pair_a, host, cafile=pair_a[0]))
    assert peer is not None
    assert fingerprint(peer) == fingerprint(load_certificate(pair_a[0]))


def test_handshake_with_a_different_cafile_fails_with_connection_error(
    pair_a: tuple[Path, Path], pair_b: tuple[Path, Path]
) -> None:
    """aioquic raises a bare ConnectionError; the reason is only in ConnectionTerminated."""
    seen: list[_RecordingProtocol] = []
    with pytest.raises(ConnectionError) as info:
        asyncio.run(_handshake(pair_a, "localhost", cafile=pair_b[0], seen=seen))
    assert type(info.value) is ConnectionError
    assert info.value.args == ()
    terminated = seen[0].terminated
    assert terminated is not None
    assert terminated.error_code == CRYPTO_ERROR_BAD_CERTIFICATE
    assert terminated.reason_phrase == "self-signed certificate"


def test_handshake_to_a_name_the_certificate_lacks_fails(pair_a: tuple[Path, Path]) -> None:
    seen: list[_RecordingProtocol] = []
    with pytest.raises(ConnectionError):
        asyncio.run(
            _handshake(
                pair_a, "127.0.0.1", cafile=pair_a[0], server_name="qsftp.invalid", seen=seen
            )
        )
    terminated = seen[0].terminated
    assert terminated is not None
    assert terminated.error_code == CRYPTO_ERROR_BAD_CERTIFICATE
    assert terminated.reason_phrase.startswith("hostname 'qsftp.invalid' doesn't match")


def test_unverified_handshake_exposes_the_certificate_for_tofu(
    tmp_path: Path, pair_a: tuple[Path, Path]
) -> None:
    peer = asyncio.run(_handshake(pair_a, "::1", verify_mode=ssl.CERT_NONE))
    assert peer is not None
    assert fingerprint(peer) == fingerprint(load_certificate(pair_a[0]))
    store = KnownHosts(tmp_path / "known_hosts")
    assert check_peer("::1", 5000, peer, known_hosts=store).how == "first-use"
    assert check_peer("::1", 5000, peer, known_hosts=store).how == "known-host"
