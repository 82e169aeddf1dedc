"""The batching UDP endpoint: many datagrams per wake-up, one flush per batch."""

from __future__ import annotations

import asyncio
import socket

from qsftp.udp import MAX_BATCH, DatagramEndpoint


def test_queued_datagrams_are_read_in_one_batch_with_one_flush() -> None:
    async def body() -> tuple[list[bytes], int]:
        received: list[bytes] = []
        flushes = 0

        def after_batch() -> None:
            nonlocal flushes
            flushes += 1

        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", 0))
        endpoint = DatagramEndpoint(
            server, receive=lambda data, addr: received.append(data), after_batch=after_batch
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for i in range(10):  # all queued before the loop gets to read any
                sender.sendto(b"d%d" % i, server.getsockname())
            for _ in range(50):
                await asyncio.sleep(0.01)
                if len(received) == 10:
                    break
        endpoint.close()
        return received, flushes

    received, flushes = asyncio.run(body())
    assert received == [b"d%d" % i for i in range(10)]
    assert flushes == 1


def test_a_batch_stops_at_max_batch_so_acks_are_not_starved() -> None:
    async def body() -> list[int]:
        sizes: list[int] = []
        count = 0

        def receive(data: bytes, addr: object) -> None:
            nonlocal count
            count += 1

        def after_batch() -> None:
            nonlocal count
            sizes.append(count)
            count = 0

        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", 0))
        endpoint = DatagramEndpoint(server, receive=receive, after_batch=after_batch)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(MAX_BATCH + 5):
                sender.sendto(b"x", server.getsockname())
            for _ in range(50):
                await asyncio.sleep(0.01)
                if sum(sizes) == MAX_BATCH + 5:
                    break
        endpoint.close()
        return sizes

    sizes = asyncio.run(body())
    assert sizes[0] == MAX_BATCH
    assert sum(sizes) == MAX_BATCH + 5


def test_connected_endpoint_sends_and_reports_refusal() -> None:
    async def body() -> list[OSError]:
        errors: list[OSError] = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(("127.0.0.1", closed_port))
        endpoint = DatagramEndpoint(
            sock, receive=lambda d, a: None, after_batch=lambda: None, error=errors.append
        )
        endpoint.sendto(b"hello", ("127.0.0.1", closed_port))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if errors:
                break
        endpoint.close()
        return errors

    errors = asyncio.run(body())
    assert errors and isinstance(errors[0], ConnectionRefusedError)
