"""The request corpus in tests/requests/{valid,invalid}: raw bytes in, expected answer out."""
import json
import pathlib

import pytest

from helpers.l7r_env import Reader, open_conn, read_to_close
from helpers.nodes import seeded_node

ROOT = pathlib.Path(__file__).resolve().parent.parent / "requests"
CASES = sorted(p.with_suffix("") for p in ROOT.glob("*/*.http"))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parent.name}/{c.name}" for c in CASES])
def test_request_corpus(case, tmp_path, pg_server, fresh_db_name):
    node = seeded_node(tmp_path, pg_server, fresh_db_name)
    try:
        node.seed.running_at(node.vm_id, node.host_id, node.vma)
        raw = case.with_suffix(".http").read_bytes().replace(b"{VM_ID}", str(node.vm_id).encode())
        expect = json.loads(case.with_suffix(".json").read_text())
        sock = open_conn(node.svc.port, node.cert)
        sock.sendall(raw)
        reader = Reader(sock)
        infos, final = reader.final()
        assert final.status == expect["status"], final
        if "infos" in expect:
            assert infos == [i.replace("{VM_ID}", str(node.vm_id)) for i in expect["infos"]]
        else:
            assert infos == []
        if "body" in expect:
            assert final.text == expect["body"]
        if "body_contains" in expect:
            assert expect["body_contains"] in final.text
        if "content_type" in expect:
            assert final.headers["content-type"] == expect["content_type"]
        elif final.status not in (101,):
            assert final.headers["content-type"] in ("text/plain", "application/json")
        if expect.get("closes"):
            assert reader.buf + read_to_close(sock) == b""   # closed, nothing after the answer
        sock.close()
    finally:
        node.close()
