import socket

import pytest

from parking import ports


def test_ports_are_below_the_range_of_outgoing_connections() -> None:
    low, _ = ports._ephemeral_range()
    picked = [ports.free_port() for _ in range(50)]
    assert all(ports._LOWEST <= port < low for port in picked)


def test_a_port_is_never_handed_out_twice() -> None:
    picked = [ports.free_port() for _ in range(200)]
    assert len(set(picked)) == len(picked)


def test_a_port_someone_listens_on_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        taken.listen()
        choices = iter([busy])
        monkeypatch.setattr(ports, "_ephemeral_range", lambda: (60_000, 61_000))
        monkeypatch.setattr(
            "parking.ports.random.choice", lambda pool: next(choices, 12_345)
        )
        port = ports.free_port()
    assert port != busy
