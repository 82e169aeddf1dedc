"""QUIC engines: the library under the glue, aioquic (default) or qh3 (optional extra).

An :class:`Engine` is everything :mod:`qsftp.session`, :mod:`qsftp.client` and
:mod:`qsftp.server` need from a QUIC library: its configuration, connection and server
classes, its event classes, and the few private details the glue adjusts (receive credit,
send-buffer size, counters, the peer certificate). The glue imports no QUIC library itself;
everything library-specific is here, one class per library.

- :data:`AIOQUIC` (aioquic 1.x, pure Python) is the default and always available.
- ``get_engine("qh3")`` is qh3 2.x, an aioquic fork with a Rust core and the same API shape
  (``pip install qsftp[qh3]``). It is imported only when asked for, so QSFTP works without it.

Both engines speak the same qsftp/1 and interoperate. The asyncio layer is QSFTP's own in both
cases (:class:`qsftp.session.QsftpProtocol` on :class:`qsftp.udp.DatagramEndpoint`): it drives
either library's sans-I/O ``QuicConnection`` through the public API the two share
(``connect``, ``receive_datagram``, ``datagrams_to_send``, ``get_timer``, ``handle_timer``,
``next_event``, ``send_stream_data``, ``reset_stream``, ``stop_stream``, ``close``). The
protocol class of an engine is a subclass whose ``engine`` attribute is that engine
(:meth:`Engine.protocol_class`), so one process can run clients and servers of both.

What qh3 2.1 cannot do, and what this module does about it (docs/QH3-ENGINE.md has the
details and measurements):

- receive credit cannot follow consumption: qh3's core slides each stream's window when data
  is *delivered* to Python, so a receiver slower than the network buffers what the sender
  sends (memory is bounded by the disk keeping up, not by ``receive_window``);
- congestion control is CUBIC only: any other choice is refused with a UsageError;
- a qh3 *server* must use Retry: qh3 counts only the packet bytes of a client Initial towards
  the anti-amplification budget, not the padding aioquic puts after the packet, and stalls
  the handshake until retransmissions add budget (0.7-1.5 s); Retry validates the address;
- a qh3 *client* advertises ``max_udp_payload_size=1472`` (hard-coded), which makes a qh3
  server send it nothing larger; :class:`Qh3Engine` omits that parameter for clients (as
  aioquic does), process-wide, once qh3 is loaded;
- packets sent, packets lost and min RTT are approximations: datagrams sent (counted by the
  glue), the core's cumulative loss count, and the smallest RTT sample the glue has seen.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import logging
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .errors import LocalFileError, UsageError

if TYPE_CHECKING:
    from .reset import StatelessReset
    from .session import QsftpProtocol

__all__ = [
    "AIOQUIC",
    "DEFAULT_ENGINE",
    "ENGINES",
    "AioquicEngine",
    "Engine",
    "Qh3Engine",
    "engine_name",
    "get_engine",
]

logger = logging.getLogger(__name__)

ENGINES = ("aioquic", "qh3")
DEFAULT_ENGINE = "aioquic"
# aioquic's idle timeout default; qh3's is 30 s. Both engines get the same unless told.
_IDLE_TIMEOUT = 60.0
# The value qh3 2.1 hard-codes as a client's max_udp_payload_size transport parameter.
_QH3_CLIENT_UDP_PAYLOAD_CAP = 1472

P = TypeVar("P", bound="QsftpProtocol")


class Engine:
    """One QUIC library as the glue sees it. Use the instances, not the classes."""

    name: str = ""
    "``aioquic`` or ``qh3``: the value of every ``engine=`` option and result column."
    congestion_controls: tuple[str, ...] = ()
    "Congestion control algorithms the library offers, the default first."
    max_datagram_size: int = 0
    "Largest ``max_datagram_size`` that works with this library, bytes."
    receive_credit_follows_consumption: bool = True
    "True when flow-control credit is raised as the application consumes (bounded memory)."
    server_requires_retry: bool = False
    "True when the library's server must validate addresses with Retry (see module docs)."
    stream_errors: tuple[type[Exception], ...] = (RuntimeError, ValueError)
    "What ``send_stream_data`` raises for a stream the peer stopped or reset."
    transmit_errors: tuple[type[Exception], ...] = ()
    "What ``datagrams_to_send`` may raise without the connection being over."
    observes_transmit: bool = False
    "True when :meth:`on_transmit` must run after every transmit (counters the library lacks)."
    derives_reset_tokens: bool = False
    "True when :meth:`adopt_reset_tokens` works: a restarted server's resets are recognised."
    gone_stream_errors: tuple[type[Exception], ...] = (ValueError,)
    "What ``reset_stream`` / ``stop_stream`` raise for a stream the library already forgot."

    def __init__(self) -> None:
        self._classes: dict[type[Any], type[Any]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Engine {self.name} {self.version}>"

    # --- the library ----------------------------------------------------------------------

    @property
    def version(self) -> str:
        """The installed library's version."""
        return importlib.metadata.version(self.name)

    @property
    def events(self) -> Any:
        """The library's ``quic.events`` module (StreamDataReceived, ConnectionTerminated …)."""
        raise NotImplementedError

    @property
    def file_logger_class(self) -> type[Any]:
        """The library's ``QuicFileLogger`` (one ``<ODCID>.qlog`` per connection)."""
        raise NotImplementedError

    def connection(
        self, configuration: Any, *, session_ticket_handler: Callable[[Any], None] | None = None
    ) -> Any:
        """A client ``QuicConnection`` for ``configuration``; ``session_ticket_handler``
        receives the session tickets the server sends (aioquic's ``SessionTicket``)."""
        return self._connection_class()(
            configuration=configuration,
            session_ticket_handler=self._portable_handler(session_ticket_handler),
        )

    def server(
        self,
        *,
        configuration: Any,
        create_protocol: Callable[..., Any],
        retry: bool,
        session_ticket_fetcher: Callable[[bytes], Any] | None = None,
        session_ticket_handler: Callable[[Any], None] | None = None,
    ) -> Any:
        """The library's ``QuicServer`` (an asyncio DatagramProtocol); Retry when asked for,
        or when the engine requires it. The ticket callbacks issue and look up session
        tickets (:class:`qsftp.tickets.TicketStore`); both libraries share aioquic's API."""
        return self._server_class()(
            configuration=configuration,
            create_protocol=create_protocol,
            retry=retry or self.server_requires_retry,
            session_ticket_fetcher=self._portable_fetcher(session_ticket_fetcher),
            session_ticket_handler=self._portable_handler(session_ticket_handler),
        )

    def _connection_class(self) -> type[Any]:
        """The library's ``QuicConnection``."""
        raise NotImplementedError

    def _server_class(self) -> type[Any]:
        """The library's asyncio ``QuicServer``."""
        raise NotImplementedError

    def _portable_handler(
        self, handler: Callable[[Any], None] | None
    ) -> Callable[[Any], None] | None:
        """``handler`` fed aioquic's ``SessionTicket`` whatever the library, so that what
        :mod:`qsftp.tickets` stores has one form (aware datetimes)."""
        return handler

    def _portable_fetcher(
        self, fetcher: Callable[[bytes], Any] | None
    ) -> Callable[[bytes], Any] | None:
        """``fetcher`` answering with this library's ``SessionTicket``."""
        return fetcher

    def protocol_class(self, base: type[P]) -> type[P]:
        """``base`` (a QsftpProtocol subclass) bound to this engine: a subclass whose
        ``engine`` is ``self``, made once per base."""
        if base.engine is self:
            return base
        with self._lock:
            cls = self._classes.get(base)
            if cls is None:
                namespace = {"engine": self, "__module__": base.__module__}
                cls = type(f"{base.__name__}[{self.name}]", (base,), namespace)
                self._classes[base] = cls
        return cast(type[P], cls)

    def warm(self) -> None:
        """Pay one-time library costs now rather than in the first measured handshake."""

    def session_ticket(self, ticket: Any) -> Any:
        """``ticket`` (either library's ``SessionTicket``, e.g. one a connection of the other
        engine received, or one read back from a ticket file) as this library's class, for
        ``configuration.session_ticket``."""
        raise NotImplementedError

    def session_resumed(self, quic: Any) -> bool:
        """True when ``quic``'s handshake resumed a session with a ticket (no certificate)."""
        return bool(quic.tls.session_resumed)

    # --- configuration --------------------------------------------------------------------

    def configuration(
        self,
        *,
        is_client: bool,
        alpn: str,
        max_stream_data: int,
        max_datagram_size: int | None = None,
        congestion_control: str | None = None,
        idle_timeout: float | None = None,
        server_name: str | None = None,
        quic_logger: Any = None,
    ) -> Any:
        """A ``QuicConfiguration`` with QSFTP's settings (certificate checks off: the caller
        turns them on with :meth:`load_verify_locations` or checks the peer itself)."""
        algorithm = self.check_congestion_control(congestion_control)
        configuration_class, options = self._configuration_class(algorithm)
        configuration = configuration_class(
            is_client=is_client,
            alpn_protocols=[alpn],
            max_stream_data=max_stream_data,
            verify_mode=ssl.CERT_NONE,
            server_name=server_name,
            idle_timeout=_IDLE_TIMEOUT if idle_timeout is None else idle_timeout,
            **options,
        )
        if max_datagram_size is not None:
            configuration.max_datagram_size = max_datagram_size
        configuration.quic_logger = quic_logger
        return configuration

    def _configuration_class(self, algorithm: str) -> tuple[type[Any], dict[str, Any]]:
        """The library's ``QuicConfiguration`` and the library-specific keyword arguments
        for it (``algorithm``: the checked congestion control)."""
        raise NotImplementedError

    def check_congestion_control(self, name: str | None) -> str:
        """``name``, or the default when None; UsageError if the library does not offer it."""
        if name is None:
            return self.congestion_controls[0]
        if name not in self.congestion_controls:
            offered = ", ".join(self.congestion_controls)
            raise UsageError(
                f"engine {self.name} offers congestion control {offered}, not {name!r}"
            )
        return name

    def congestion_control(self, configuration: Any) -> str:
        """The algorithm ``configuration`` runs."""
        return self.congestion_controls[0]

    def load_cert_chain(self, configuration: Any, certfile: Any, keyfile: Any) -> None:
        """Load the server's certificate and key; LocalFileError if they do not load."""
        try:
            configuration.load_cert_chain(certfile, keyfile)
        except (OSError, ValueError) as exc:
            raise LocalFileError(
                f"cannot load certificate {certfile} / key {keyfile}: {exc}"
            ) from exc

    def load_verify_locations(self, configuration: Any, cafile: str) -> None:
        """Verify the peer's chain, dates and name against ``cafile``."""
        configuration.verify_mode = ssl.CERT_REQUIRED
        try:
            configuration.load_verify_locations(cafile=cafile)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise LocalFileError(f"cannot load CA file {cafile}: {exc}") from exc

    # --- a connection's internals ---------------------------------------------------------

    def instrument(self, protocol: QsftpProtocol) -> None:
        """Adjust a new connection (counters, credit rule) before it carries anything."""

    def raise_credit(self, protocol: QsftpProtocol, stream_id: int, unconsumed: int) -> bool:
        """Let the peer send up to ``receive_window`` bytes beyond what the application has
        consumed of ``stream_id`` (``unconsumed`` DATA bytes are still waiting). True when a
        MAX_STREAM_DATA frame is now due."""
        return False

    def on_transmit(self, protocol: QsftpProtocol) -> None:
        """After each transmit, when :attr:`observes_transmit`: sample what the library does
        not record itself."""

    def send_buffered(self, quic: Any, stream_id: int) -> int:
        """Bytes of ``stream_id`` held by the library for sending (see each engine)."""
        raise NotImplementedError

    def stats(self, protocol: QsftpProtocol) -> dict[str, Any]:
        """The :class:`~qsftp.session.QuicStats` fields of ``protocol``'s connection."""
        raise NotImplementedError

    def peer_certificate(self, quic: Any) -> bytes | None:
        """The peer's certificate as DER, or None (no certificate, e.g. a resumed session)."""
        raise NotImplementedError

    def abort(self, quic: Any, reason: str) -> None:
        """End the connection at once, without a CONNECTION_CLOSE (the socket failed)."""
        raise NotImplementedError

    def adopt_reset_tokens(self, quic: Any, reset: StatelessReset) -> None:
        """Server: give the new connection ``quic`` stateless reset tokens derived by
        ``reset`` instead of the library's random ones (no-op where that cannot be done)."""

    def peer_reset_token(self, quic: Any) -> bytes | None:
        """Client: the stateless reset token the server gave for the connection ID in use,
        or None when the library does not tell."""
        return None

    def abort_stream(self, quic: Any, stream_id: int, error_code: int) -> None:
        """Reset ``stream_id`` and stop the peer's sending on it; nothing if the library
        has already forgotten the stream."""
        try:
            quic.reset_stream(stream_id, error_code)
            quic.stop_stream(stream_id, error_code)
        except self.gone_stream_errors:
            pass  # already discarded by the library: nothing left to stop

    def stop_stream(self, quic: Any, stream_id: int, error_code: int) -> None:
        """Ask the peer to stop sending on ``stream_id`` (STOP_SENDING); nothing if the
        library has already forgotten the stream."""
        with contextlib.suppress(*self.gone_stream_errors):
            quic.stop_stream(stream_id, error_code)

    def receive_finished(self, protocol: QsftpProtocol, stream_id: int) -> bool:
        """True when the peer's half of ``stream_id`` has ended (FIN or RESET_STREAM)."""
        raise NotImplementedError


class AioquicEngine(Engine):
    """aioquic 1.x. Its private details used here were read in aioquic 1.7.2."""

    name = "aioquic"
    congestion_controls = ("reno", "cubic")
    derives_reset_tokens = True
    # A STREAM frame's length is written as a 2-byte varint: 16415 and above break.
    max_datagram_size = 16414

    def __init__(self) -> None:
        super().__init__()
        from aioquic.quic import events  # noqa: PLC0415 - only engines import the library

        self._events = events

    @property
    def events(self) -> Any:
        return self._events

    @property
    def file_logger_class(self) -> type[Any]:
        from aioquic.quic.logger import QuicFileLogger  # noqa: PLC0415

        return QuicFileLogger

    def _connection_class(self) -> type[Any]:
        from aioquic.quic.connection import QuicConnection  # noqa: PLC0415

        return QuicConnection

    def _server_class(self) -> type[Any]:
        from aioquic.asyncio.server import QuicServer  # noqa: PLC0415

        return QuicServer

    def session_ticket(self, ticket: Any) -> Any:
        from aioquic import tls  # noqa: PLC0415

        return _convert_ticket(ticket, tls.SessionTicket, tls.CipherSuite)

    def _configuration_class(self, algorithm: str) -> tuple[type[Any], dict[str, Any]]:
        from aioquic.quic.configuration import QuicConfiguration  # noqa: PLC0415

        return QuicConfiguration, {"congestion_control_algorithm": algorithm}

    def congestion_control(self, configuration: Any) -> str:
        return str(configuration.congestion_control_algorithm)

    def instrument(self, protocol: QsftpProtocol) -> None:
        """Count lost packets and replace aioquic's receive-credit rule with the glue's.

        aioquic has no public hook for either: both are instance-level wrappers around
        private methods of aioquic 1.x, kept here so that nothing else depends on them.
        """
        quic: Any = protocol._quic
        original_lost = quic._loss._on_packets_lost
        original_limits = quic._write_stream_limits

        def on_packets_lost(*, packets: Any, **kwargs: Any) -> None:
            packets = list(packets)
            protocol.packets_lost += len(packets)
            original_lost(packets=packets, **kwargs)

        def write_stream_limits(*, builder: Any, space: Any, stream: Any) -> None:
            # aioquic doubles the window whenever the peer has sent half of it, whether or not
            # we read anything. Hiding the highest offset turns that rule off; our credit is
            # raised in raise_credit() instead.
            receiver = stream.receiver
            highest, receiver.highest_offset = receiver.highest_offset, 0
            try:
                original_limits(builder=builder, space=space, stream=stream)
            finally:
                receiver.highest_offset = highest

        quic._loss._on_packets_lost = on_packets_lost
        quic._write_stream_limits = write_stream_limits

    def raise_credit(self, protocol: QsftpProtocol, stream_id: int, unconsumed: int) -> bool:
        # QUIC counts every byte of the stream, frame headers and control messages included;
        # only DATA payloads wait for the application. So the credit limit is: bytes received
        # so far, less the payload bytes not yet consumed, plus the window.
        stream = protocol._quic._streams.get(stream_id)
        if stream is None:
            return False
        window = protocol.receive_window
        target = stream.receiver.highest_offset - unconsumed + window
        # Raised in steps of a quarter window at least, so MAX_STREAM_DATA frames stay rare.
        if target - stream.max_stream_data_local >= window // 4:
            stream.max_stream_data_local = target
            return True
        return False

    def send_buffered(self, quic: Any, stream_id: int) -> int:
        """Bytes not yet acknowledged (unsent and in flight)."""
        stream = quic._streams.get(stream_id)
        return len(stream.sender._buffer) if stream is not None else 0

    def stats(self, protocol: QsftpProtocol) -> dict[str, Any]:
        quic = protocol._quic
        loss = quic._loss
        min_rtt = loss._rtt_min if loss._rtt_initialized else 0.0
        return {
            "packets_sent": quic._packet_number,
            "packets_lost": protocol.packets_lost,
            "smoothed_rtt_ms": loss._rtt_smoothed * 1000.0,
            "min_rtt_ms": min_rtt * 1000.0,
            "congestion_window": loss.congestion_window,
        }

    def peer_certificate(self, quic: Any) -> bytes | None:
        from cryptography.hazmat.primitives.serialization import Encoding  # noqa: PLC0415

        cert = getattr(quic.tls, "_peer_certificate", None)
        return None if cert is None else bytes(cert.public_bytes(Encoding.DER))

    def adopt_reset_tokens(self, quic: Any, reset: StatelessReset) -> None:
        reset.adopt(quic)  # wraps aioquic's _replenish_connection_ids (qsftp.reset)

    def peer_reset_token(self, quic: Any) -> bytes | None:
        token = quic._peer_cid.stateless_reset_token
        return None if token is None else bytes(token)

    def receive_finished(self, protocol: QsftpProtocol, stream_id: int) -> bool:
        """Also True for a stream aioquic has discarded (both halves over)."""
        stream = protocol._quic._streams.get(stream_id)
        return stream is None or bool(stream.receiver.is_finished)

    def abort(self, quic: Any, reason: str) -> None:
        quic._close_event = self._events.ConnectionTerminated(
            error_code=0, frame_type=None, reason_phrase=reason
        )
        quic._close_end()


class _Qh3LogFilter(logging.Filter):
    """Drops qh3's ``Native peer close`` warning, which it logs on every normal close."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Native peer close")


class Qh3Engine(Engine):
    """qh3 2.x (Rust core). Importing qh3 is deferred to the first use of the engine."""

    name = "qh3"
    congestion_controls = ("cubic",)  # CUBIC + HyStart++ in the Rust core, nothing else
    # The UDP payload a loopback interface (MTU 65536) carries over IPv6.
    max_datagram_size = 65488
    receive_credit_follows_consumption = False
    server_requires_retry = True
    stream_errors = (RuntimeError, ValueError)
    observes_transmit = True

    def __init__(self) -> None:
        super().__init__()
        self._loaded = False
        self._events: Any = None
        self._warm = False

    def load(self) -> None:
        """Import qh3 (UsageError when it is not installed) and apply the client fix."""
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            try:
                from qh3.quic import connection, events, tls_bridge  # noqa: PLC0415
            except ImportError as exc:
                raise UsageError(
                    f"engine qh3 needs `pip install qsftp[qh3]` (cannot import qh3: {exc})"
                ) from exc
            self._events = events
            self.transmit_errors = (connection.QuicConnectionError,)
            # The Rust core refuses a reset/stop on a stream it has closed (a RuntimeError
            # that qh3 re-raises as QuicConnectionError); the connection is not affected.
            self.gone_stream_errors = (ValueError, connection.QuicConnectionError)
            _lift_client_udp_payload_cap(tls_bridge)
            logging.getLogger("quic").addFilter(_Qh3LogFilter())
            self._loaded = True

    @property
    def events(self) -> Any:
        self.load()
        return self._events

    @property
    def file_logger_class(self) -> type[Any]:
        self.load()
        from qh3.quic.logger import QuicFileLogger  # noqa: PLC0415

        return QuicFileLogger

    def warm(self) -> None:
        """Create one key exchange: the crypto library's one-time set-up (~35 ms here)."""
        self.load()
        if not self._warm:
            from qh3._hazmat import X25519KeyExchange  # noqa: PLC0415

            X25519KeyExchange()
            self._warm = True

    def _connection_class(self) -> type[Any]:
        self.load()
        from qh3.quic.connection import QuicConnection  # noqa: PLC0415

        return QuicConnection

    def _server_class(self) -> type[Any]:
        self.load()
        from qh3.asyncio.server import QuicServer  # noqa: PLC0415

        return QuicServer

    def _portable_fetcher(
        self, fetcher: Callable[[bytes], Any] | None
    ) -> Callable[[bytes], Any] | None:
        if fetcher is None:
            return None
        fetch = fetcher

        def converting(label: bytes) -> Any:
            found = fetch(label)
            return None if found is None else self.session_ticket(found)

        return converting

    def session_ticket(self, ticket: Any) -> Any:
        self.load()
        from qh3 import tls  # noqa: PLC0415

        # qh3 compares ticket times with naive UTC datetimes (aioquic: aware ones).
        return _convert_ticket(ticket, tls.SessionTicket, tls.CipherSuite, naive=True)

    def _portable_handler(
        self, handler: Callable[[Any], None] | None
    ) -> Callable[[Any], None] | None:
        if handler is None:
            return None
        deliver = handler

        def portable(ticket: Any) -> None:
            deliver(AIOQUIC.session_ticket(ticket))

        return portable

    def session_resumed(self, quic: Any) -> bool:
        context = quic.tls  # None once qh3 has dropped its TLS state (a closed connection)
        return context is not None and bool(context.session_resumed)

    def _configuration_class(self, algorithm: str) -> tuple[type[Any], dict[str, Any]]:
        self.load()
        from qh3.quic.configuration import QuicConfiguration  # noqa: PLC0415

        # The datagram size stays what the caller chose: no path-MTU probing upwards.
        return QuicConfiguration, {"probe_datagram_size": False}

    def load_verify_locations(self, configuration: Any, cafile: str) -> None:
        # qh3 reads the file during the handshake: check here that it is there and readable,
        # so a wrong path fails as it does with aioquic, before any packet is sent.
        try:
            with open(cafile, "rb") as file:
                file.read(1)
        except OSError as exc:
            raise LocalFileError(f"cannot load CA file {cafile}: {exc.strerror}") from exc
        super().load_verify_locations(configuration, cafile)

    def on_transmit(self, protocol: QsftpProtocol) -> None:
        # The core keeps its minimum RTT to itself; the smallest sample seen is close to it.
        quic: Any = protocol._quic
        core = quic._core
        if core is not None:
            rtt = core.latest_rtt
            if rtt is not None and (rtt < protocol.min_rtt or protocol.min_rtt == 0.0):
                protocol.min_rtt = rtt

    def send_buffered(self, quic: Any, stream_id: int) -> int:
        """Bytes not yet sent once (qh3 excludes those in flight; the congestion window
        bounds them)."""
        return int(quic.get_send_buffer_size(stream_id))

    def stats(self, protocol: QsftpProtocol) -> dict[str, Any]:
        quic: Any = protocol._quic
        core = quic._core
        if core is None:  # closed: the last figures the glue saw
            return {
                "packets_sent": protocol.datagrams_sent,
                "packets_lost": protocol.packets_lost,
                "smoothed_rtt_ms": protocol.last_smoothed_rtt * 1000.0,
                "min_rtt_ms": protocol.min_rtt * 1000.0,
                "congestion_window": 0,
            }
        srtt = core.smoothed_rtt or 0.0
        protocol.packets_lost = core.loss_total
        protocol.last_smoothed_rtt = srtt
        return {
            "packets_sent": protocol.datagrams_sent,
            "packets_lost": core.loss_total,
            "smoothed_rtt_ms": srtt * 1000.0,
            "min_rtt_ms": protocol.min_rtt * 1000.0,
            "congestion_window": core.congestion_window,
        }

    def peer_certificate(self, quic: Any) -> bytes | None:
        cert = quic.get_peercert()
        return None if cert is None else bytes(cert.public_bytes())

    def peer_reset_token(self, quic: Any) -> bytes | None:
        """The token of the server's first connection ID, from its transport parameters: a
        qh3 client keeps using that ID (no migration), and the Rust core keeps later tokens
        to itself. (The server side cannot derive tokens: its first token is drawn in qh3's
        TLS bridge and later ones in the core, so :meth:`adopt_reset_tokens` is a no-op.)"""
        parameters = getattr(quic, "_applied_transport_parameters", None)
        token = getattr(parameters, "stateless_reset_token", None)
        return None if token is None else bytes(token)

    def receive_finished(self, protocol: QsftpProtocol, stream_id: int) -> bool:
        """qh3 does not expose its streams: the glue's record of the FIN or RESET_STREAM it
        delivered on a stream with an open channel (False for any other stream, so a stream
        without a channel is told to stop, which costs one STOP_SENDING at most)."""
        return stream_id in protocol._receive_ended

    def abort(self, quic: Any, reason: str) -> None:
        # qh3's facade has no _close_end(): do what it would.
        from qh3.quic.connection import QuicConnectionState  # noqa: PLC0415

        event = self.events.ConnectionTerminated(
            error_code=0, frame_type=None, reason_phrase=reason
        )
        quic._close_event = event
        quic._state = QuicConnectionState.TERMINATED
        quic._events.append(event)
        quic._core = None


def _lift_client_udp_payload_cap(tls_bridge: Any) -> None:
    """qh3 2.1 always sends ``max_udp_payload_size=1472`` as a client, so a qh3 server never
    sends that client a datagram above 1472 bytes, whatever both sides chose (a download at
    16384-byte datagrams then costs 11x the packets). Omit it, as aioquic does: each side
    still sends at most its own ``max_datagram_size``."""
    original = tls_bridge.push_quic_transport_parameters
    if getattr(original, "_qsftp_wrapped", False):
        return

    def push_quic_transport_parameters(buf: Any, parameters: Any) -> Any:
        is_client = parameters.original_destination_connection_id is None
        if is_client and parameters.max_udp_payload_size == _QH3_CLIENT_UDP_PAYLOAD_CAP:
            parameters.max_udp_payload_size = None
        return original(buf, parameters)

    push_quic_transport_parameters._qsftp_wrapped = True  # type: ignore[attr-defined]
    tls_bridge.push_quic_transport_parameters = push_quic_transport_parameters


def _convert_ticket(
    ticket: Any, ticket_class: type[Any], suites: type[Any], *, naive: bool = False
) -> Any:
    """``ticket`` as an instance of ``ticket_class``: the two libraries' ``SessionTicket``
    dataclasses have the same fields; the cipher suite becomes the library's own enum, and
    the validity times UTC, naive (qh3) or aware (aioquic)."""
    if isinstance(ticket, ticket_class):
        return ticket

    def utc(moment: datetime.datetime) -> datetime.datetime:
        if moment.tzinfo is not None:
            moment = moment.astimezone(datetime.UTC)
        return moment.replace(tzinfo=None if naive else datetime.UTC)

    return ticket_class(
        age_add=ticket.age_add,
        cipher_suite=suites(int(ticket.cipher_suite)),
        not_valid_after=utc(ticket.not_valid_after),
        not_valid_before=utc(ticket.not_valid_before),
        resumption_secret=ticket.resumption_secret,
        server_name=ticket.server_name,
        ticket=ticket.ticket,
        max_early_data_size=ticket.max_early_data_size,
        other_extensions=list(ticket.other_extensions),
    )


AIOQUIC = AioquicEngine()
_QH3 = Qh3Engine()
_BY_NAME: dict[str, Engine] = {"aioquic": AIOQUIC, "qh3": _QH3}


def get_engine(engine: str | Engine | None = None) -> Engine:
    """The engine called ``engine`` ("aioquic", the default, or "qh3"), ready to use.

    UsageError for an unknown name, or for qh3 when it is not installed.
    """
    if isinstance(engine, Engine):
        return engine
    name = DEFAULT_ENGINE if engine is None else engine
    found = _BY_NAME.get(name)
    if found is None:
        raise UsageError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}")
    if isinstance(found, Qh3Engine):
        found.load()
    return found


def engine_name(engine: str | Engine | None) -> str:
    """The name of ``engine`` (None: the default) without loading it."""
    if isinstance(engine, Engine):
        return engine.name
    return DEFAULT_ENGINE if engine is None else engine
