"""VMA pure parts: SimpleRPC framing, nxagent log lines -> x_state, timeouts, options file."""
import json

import pytest

from qvd_gevent.config import Config
from qvd_gevent.vma import rpc
from qvd_gevent.vma.xstate import (
    NX_TO_X,
    InvalidOption,
    StateTracker,
    nx_state_from_log_line,
    nxagent_options,
    x_state_of,
)


def client_decode(body):
    """The original SimpleRPC client's rule: wrap in [...]; two elements mean an error."""
    return json.loads("[" + body.decode("ascii") + "]")


def test_request_without_host_and_with_repeated_keys():
    req = rpc.parse_request_head(b"GET /vma/x_start?a=1&qvd.client.keyboard=pc105%2Fes&a=2&empty= HTTP/1.1\r\n"
                                 b"User-Agent: QVD::HTTPC/0.01 (linux)")
    assert req.rpc_method == "x_start"
    assert req.params == {"a": "2", "qvd.client.keyboard": "pc105/es", "empty": ""}
    assert req.keep_alive


def test_request_keep_alive_rules():
    assert not rpc.parse_request_head(b"GET /vma/ping HTTP/1.1\r\nConnection: close").keep_alive
    assert not rpc.parse_request_head(b"GET /vma/ping HTTP/1.0").keep_alive
    assert rpc.parse_request_head(b"GET /vma/ping HTTP/1.0\r\nconnection: Keep-Alive").keep_alive


@pytest.mark.parametrize("head", [b"GET /vma/ping", b"GET /vma/ping HTTP/2.0", b"GET /vma/ping HTTP/1.1\r\nno colon"])
def test_malformed_requests(head):
    with pytest.raises(rpc.BadRequest):
        rpc.parse_request_head(head)


def test_paths_outside_vma_are_not_methods():
    assert rpc.parse_request_head(b"GET /ping HTTP/1.1").rpc_method is None
    assert rpc.parse_request_head(b"GET /vma/../x HTTP/1.1").rpc_method is None


def test_result_and_error_framing():
    body = rpc.encode_result("listening")
    assert body.endswith(b"\r\n")
    assert client_decode(body) == ["listening"]
    err = rpc.encode_error('Invalid value "x y"')
    assert err.startswith(b'"",') and err.endswith(b"\r\n")
    assert client_decode(err) == ["", 'Invalid value "x y"']
    resp = rpc.response(body)
    head, _, rest = resp.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
    assert b"Content-Type: application/json-simplerpc" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert rest == body


def test_secrets_masked_in_log_params():
    assert rpc.mask_params({"password": "x", "qvd.vm.user.passwd": "y", "a": "b", "auth_token": "t",
                            "qvd.slave.key": "k", "qvd.client.keyboard": "pc105/es"}) == \
        {"password": "*****", "qvd.vm.user.passwd": "*****", "a": "b", "auth_token": "*****",
         "qvd.slave.key": "*****", "qvd.client.keyboard": "pc105/es"}


@pytest.mark.parametrize("line,state", [
    ("Session: Starting session at 'Wed Nov 25 20:49:39 2026'.", "starting"),
    ("Session: Session started at 'Wed Nov 25 20:49:47 2026'.", "started"),
    ("Session: Suspending session at 'Wed Nov 25 20:50:02 2026'.", "suspending"),
    ("Session: Session suspended at 'Wed Nov 25 20:50:03 2026'.", "suspended"),
    ("Session: Resuming session at 'x'.", "resuming"),
    ("Session: Session resumed at 'x'.", "resumed"),
    ("Session: Terminating session at 'x'.", "terminating"),
    ("Session: Session terminated at 'x'.", "terminated"),
    ("Session: Display failure detected at 'Wed Nov 25 20:50:02 2026'.", None),
    ("Info: Waiting for connection from any host on socket 'tcp:*:4137'.", None),
])
def test_nxagent_log_lines(line, state):
    """Lines copied from a real nxagent 3.5.99.26 run on this machine."""
    assert nx_state_from_log_line(line) == state


def test_nx_to_x_mapping_is_the_originals():
    assert [x_state_of(s) for s in ("initiating", "starting", "started", "suspended", "terminated")] == \
        ["starting", "listening", "connected", "suspended", "stopped"]
    assert x_state_of(None) == "stopped" and x_state_of("bogus") == "stopped"
    assert NX_TO_X["resuming"] == "listening" and NX_TO_X["aborting"] == "stopping"


TIMEOUTS = {"starting": 20, "listening": 10, "suspending": 20, "stopping": 20}


def test_tracker_follows_log_and_dead_process_reads_stopped():
    t = StateTracker(TIMEOUTS, now=0)
    t.set("initiating", 0)
    assert t.x_state(1, alive=True) == ("starting", False)
    t.feed_line("Session: Starting session at 'x'.", 2)
    assert t.x_state(3, alive=True) == ("listening", False)
    t.feed_line("Session: Session started at 'x'.", 4)
    assert t.x_state(500, alive=True) == ("connected", False)  # no timeout while connected
    assert t.x_state(500, alive=False) == ("stopped", False)


def test_listening_timeout_expires():
    t = StateTracker(TIMEOUTS, now=0)
    t.set("starting", 100)
    assert t.x_state(110, alive=True) == ("listening", False)
    assert t.x_state(110.5, alive=True) == ("stopping", True)


def test_starting_timeout_is_applied():
    """The original keyed this timeout on 'initiating', which never occurs after mapping."""
    t = StateTracker(TIMEOUTS, now=0)
    t.set("initiating", 0)
    assert t.x_state(19, alive=True) == ("starting", False)
    assert t.x_state(21, alive=True) == ("stopping", True)


def cfg_get(overrides=None):
    return Config(overrides or {}, None).get


def test_options_from_client_params():
    line = nxagent_options({"qvd.client.keyboard": "pc105/es", "qvd.client.os": "linux",
                            "qvd.client.link": "lan", "qvd.client.geometry": "1024x768",
                            "qvd.client.fullscreen": ""}, cfg_get(), 100)
    assert line == "nx/nx,keyboard=pc105/es,client=linux,link=lan,geometry=1024x768,tolerancechecks=risky:100"


def test_default_keyboard_and_link_are_applied():
    line = nxagent_options({"qvd.client.geometry": "800x600"},
                           cfg_get({"vma.default.client.keyboard": "pc105/de"}), 100)
    assert "keyboard=pc105/de" in line and "link=adsl" in line


@pytest.mark.parametrize("key,value", [("qvd.client.geometry", "800x600,fullscreen=1"),
                                       ("qvd.client.keyboard", "pc105/es;rm -rf"),
                                       ("qvd.client.link", "a b"),
                                       ("qvd.client.geometry", "800x600\n"),        # matched whole
                                       ("qvd.client.keyboard", "pc105/é"),          # ASCII only
                                       ("qvd.client.geometry", "８００x600")])
def test_option_values_are_validated(key, value):
    with pytest.raises(InvalidOption):
        nxagent_options({key: value}, cfg_get(), 100)


def test_audio_slave_printing_options():
    get = cfg_get({"vma.audio.enable": "1", "vma.slave.enable": "1", "vma.printing.enable": "1"})
    line = nxagent_options({"qvd.client.printing.enabled": "1", "qvd.client.os": "windows"}, get, 100)
    assert "media=1" in line and "slave=1" in line and "smb=2100" in line


def test_client_nxagent_options_come_from_an_allowlist_and_the_server_s_last():
    get = cfg_get({"vma.audio.enable": "1", "vma.slave.enable": "1", "vma.printing.enable": "1"})
    line = nxagent_options({"qvd.client.nxagent.extra_args": "cache=8M,images=32M,pack=16m-jpeg-9,render=1",
                            "qvd.client.printing.enabled": "1"}, get, 100, listen_socket="/run/vma/nx.sock")
    options = line[len("nx/nx,"):-len(":100")].split(",")
    extras = [options.index(o) for o in ("cache=8M", "images=32M", "pack=16m-jpeg-9", "render=1")]
    servers = [options.index(o) for o in ("media=1", "slave=1", "listen=unix:/run/vma/nx.sock",
                                           "tolerancechecks=risky", "cups=2100")]
    assert max(extras) < min(servers)
    assert nxagent_options({"qvd.client.nxagent.extra_args": ""}, cfg_get(), 100) == \
        nxagent_options({}, cfg_get(), 100)          # the original client sends it empty


@pytest.mark.parametrize("extra", [
    "listen=tcp:0.0.0.0:4000", "accept=10.0.0.1", "connect=tcp:evil.example:4000", "port=4000",
    "errors=/etc/passwd", "stats=/tmp/x", "options=/tmp/other.conf", "session=other", "id=abc",
    "slave=1", "media=1", "cups=2100", "smb=2100", "clipboard=both", "keyboard=us", "link=lan",
    "tolerancechecks=bypass", "cache=8M\n", "cache=8M,", ",cache=8M", "cache", "cache=8M=1",
    "cache=８M", "render=1,listen=tcp:0.0.0.0:4000", "pack=16m jpeg", "tile=64x64x64", "limit=-1",
])
def test_client_nxagent_options_outside_the_allowlist_fail_the_x_start(extra):
    with pytest.raises(InvalidOption, match="qvd.client.nxagent.extra_args"):
        nxagent_options({"qvd.client.nxagent.extra_args": extra}, cfg_get(), 100)
