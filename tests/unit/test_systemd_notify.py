"""The node's side of systemd's notification protocol, against a real datagram socket."""
import os
import socket

import gevent
from gevent import monkey

from qvd_gevent.node import systemd

_real_socket = monkey.get_original("socket", "socket")
_real_sleep = monkey.get_original("time", "sleep")


def _receiver(path):
    sock = _real_socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    return sock


def _drain(sock):
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


def test_notify_sends_one_datagram_and_is_silent_without_systemd(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    receiver = _receiver(tmp_path / "n.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n.sock"))
    try:
        assert systemd.notify("READY=1", "STATUS=serving") is True
        assert _drain(receiver) == ["READY=1\nSTATUS=serving"]
    finally:
        receiver.close()


def test_abstract_socket_names(monkeypatch):
    name = f"qvd-test-{os.getpid()}"
    receiver = _real_socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert systemd.notify("STOPPING=1")
        assert _drain(receiver) == ["STOPPING=1"]
    finally:
        receiver.close()


def test_watchdog_period_follows_watchdog_usec_and_pid(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_period() == 15
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))   # meant for another process
    assert systemd.watchdog_period() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_period() == 15
    monkeypatch.delenv("WATCHDOG_USEC")
    assert systemd.watchdog_period() is None


def test_watchdog_pings_come_from_the_hub_and_stop_while_it_is_blocked(tmp_path, monkeypatch):
    receiver = _receiver(tmp_path / "w.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "w.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")       # a ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    pinger = systemd.start_watchdog()
    try:
        gevent.sleep(0.55)
        assert len(_drain(receiver)) >= 2                  # about 5; fewer on a busy machine
        _real_sleep(0.6)                                   # the hub is stuck in a blocking call
        assert _drain(receiver) == []                      # so systemd hears nothing and restarts us
        gevent.sleep(0.35)
        assert len(_drain(receiver)) >= 1                  # the hub runs again, so do the pings
    finally:
        pinger.kill()
        receiver.close()


def test_the_unit_file_uses_what_the_node_sends():
    import configparser
    import pathlib
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(pathlib.Path(__file__).resolve().parents[2] / "etc" / "qvd-node.service")
    service = unit["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert int(service["WatchdogSec"]) > 0
    assert service["RestartPreventExitStatus"] == str(systemd.EXIT_CONFIG) == "78"
    assert service["Restart"] == "on-failure"
    assert unit["Unit"]["Documentation"] == "file:/usr/share/doc/qvd-gevent/README.md"
