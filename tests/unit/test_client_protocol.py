"""qvd-client's sans-I/O protocol: requests as the original client, the 102*/101/final sequence."""
import pytest

from qvd_gevent.client import protocol
from qvd_gevent.client.protocol import Final, Progress, ProtocolError, ResponseReader, Switched

# The original L7R's answer to connect_to_vm (docs/protocol.md#the-original-client), byte for byte.
CONNECT_TRANSCRIPT = (
    b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: Session acquired for VM_ID: 10\r\n\r\n"
    b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: Starting X session at VM 10\r\n\r\n"
    b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: Waiting for X session to come up on VM 10\r\n\r\n"
    b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: Connecting X session for VM_ID: 10\r\n\r\n"
    b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: Connection established\r\n\r\n"
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"X-QVD-Slave-Key: xz5oll8X2tXIvd5yzR3avsrXRLoJfGlyUhlSn1zqvAzPkvnClXma7K6I6djFiCwK\r\n\r\n"
)
PROGRESS = ["Session acquired for VM_ID: 10", "Starting X session at VM 10",
            "Waiting for X session to come up on VM 10", "Connecting X session for VM_ID: 10",
            "Connection established"]


def feed_in_pieces(data, size):
    reader = ResponseReader()
    events = []
    for i in range(0, len(data), size):
        events += reader.feed(data[i:i + size])
        if reader.switched:
            break
    return events


@pytest.mark.parametrize("size", [1, 7, 64, 100000])
def test_connect_sequence_in_any_split(size):
    tail = b"\x00NX bytes that came with the 101"
    events = feed_in_pieces(CONNECT_TRANSCRIPT + tail, size)
    assert [e.text for e in events if isinstance(e, Progress)] == PROGRESS
    switched = events[-1]
    assert isinstance(switched, Switched)
    assert switched.headers["x-qvd-slave-key"].startswith("xz5oll8X")
    # Bytes after the 101 in the same read belong to the VM's stream; with small pieces the
    # rest comes in later reads, which the caller reads from the socket itself.
    if size == 100000:
        assert switched.rest == tail


def test_progress_then_503():
    body = b"The requested virtual machine is not available: VM didn't reach state 'running'. Timeout, retry later."
    data = (b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: Starting virtual machine\r\n\r\n"
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)
    events = feed_in_pieces(data, 5)
    assert events[0] == Progress("Starting virtual machine")
    final = events[1]
    assert isinstance(final, Final) and final.status == 503 and final.body == body
    assert "not available (503): The requested virtual machine is not available" in \
        protocol.error_message(final, "connect", 10)


def test_list_answer_then_more_on_keep_alive():
    body = b'[{"name":"qvd-vm1","state":"running","id":10,"blocked":0,"is_application":0}]'
    one = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    reader = ResponseReader()
    events = reader.feed(one + one[:20])
    assert len(events) == 1 and events[0].status == 200
    assert protocol.parse_vm_list(events[0].body) == [
        {"id": 10, "name": "qvd-vm1", "state": "running", "blocked": False}]
    assert reader.feed(one[20:])[0].body == body


def test_blocked_as_number_or_boolean():
    vms = protocol.parse_vm_list(b'[{"id":1,"name":"a","state":"stopped","blocked":1},'
                                 b'{"id":2,"name":"b","state":"stopped","blocked":true}]')
    assert [vm["blocked"] for vm in vms] == [True, True]
    with pytest.raises(ProtocolError):
        protocol.parse_vm_list(b"<html>")


def test_body_until_eof_without_content_length():
    reader = ResponseReader()
    assert reader.feed(b"HTTP/1.1 500 Internal Server Error\r\n\r\ndie text") == []
    assert reader.feed_eof() == [Final(500, "Internal Server Error", {}, b"die text")]


def test_eof_mid_response_and_garbage_are_errors():
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: x\r\n\r\nHTTP/1.1 4")
    with pytest.raises(ProtocolError):
        reader.feed_eof()
    with pytest.raises(ProtocolError):
        ResponseReader().feed(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(ProtocolError, match="without a response"):
        ResponseReader().feed_eof()


def final(status, body=b"", reason="X"):
    return Final(status, reason, {}, body)


@pytest.mark.parametrize("status,body,expected", [
    (401, b"401 Unauthorized\nlong text", "login rejected by the server (401): 401 Unauthorized"),
    (403, b"The requested virtual machine is offline for maintenance",
     "access denied (403): The requested virtual machine is offline for maintenance"),
    (404, b"The requested virtual machine does not exist", "the virtual machine 10 does not exist (404)"),
    (426, b"426 Upgrade Required", "the server requires a more up-to-date client (426)"),
    (503, b"Server is blocked", "the server is not available (503): Server is blocked"),
    (422, b"parameter id is missing", "the server answered 422 X: parameter id is missing"),
])
def test_error_messages(status, body, expected):
    assert protocol.error_message(final(status, body), "connect", 10) == expected


def test_requests_carry_the_original_clients_headers():
    req = protocol.build_request("/qvd/list_of_vm", [], protocol.basic_auth("qvd", "qvd"), accept_json=True)
    assert req == (b"GET /qvd/list_of_vm? HTTP/1.1\r\nAuthorization: Basic cXZkOnF2ZA==\r\n"
                   b"Accept: application/json\r\nUser-Agent: QVD::HTTPC/0.01 (linux)\r\n\r\n")
    req = protocol.build_request("/qvd/connect_to_vm", [("id", "10"), ("qvd.client.keyboard", "pc105/es"),
                                                        ("qvd.client.fullscreen", "")],
                                 protocol.bearer_auth("tok"), host="10.0.0.1", upgrade=True)
    lines = req.split(b"\r\n")
    assert lines[0] == b"GET /qvd/connect_to_vm?id=10&qvd.client.keyboard=pc105%2Fes&qvd.client.fullscreen= HTTP/1.1"
    assert b"Connection: Upgrade" in lines and b"Upgrade: QVD/1.0" in lines
    assert b"Authorization: Bearer dG9r" in lines and b"Host: 10.0.0.1" in lines
    assert req.endswith(b"\r\n\r\n")


def test_h11_agrees_on_102_then_101():
    """Cross-check our reader against h11's client mode on the same bytes."""
    import h11
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/qvd/connect_to_vm?id=10",
                          headers=[("Host", "x"), ("Connection", "Upgrade"), ("Upgrade", "QVD/1.0")]))
    conn.receive_data(CONNECT_TRANSCRIPT)
    seen = []
    while True:
        event = conn.next_event()
        if event is h11.PAUSED or event is h11.NEED_DATA:
            break
        seen.append(event.status_code)
    assert seen == [102] * 5 + [101]
