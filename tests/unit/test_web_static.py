"""The browser client's files: found by their listed name only, right content types,
revalidation, security headers; hostile paths find nothing."""
import pytest

from qvd_gevent.l7r import static

FILES = static.StaticFiles()


def test_the_page_its_script_and_novnc_are_packaged():
    page = FILES.lookup("/")
    assert page is FILES.lookup("/index.html")
    assert page.content_type == "text/html; charset=utf-8"
    assert b'src="app.js"' in page.body
    assert FILES.lookup("/app.js").content_type == "text/javascript; charset=utf-8"
    assert b'from "./novnc/core/rfb.js"' in FILES.lookup("/app.js").body
    assert FILES.lookup("/app.css").content_type == "text/css; charset=utf-8"
    rfb = FILES.lookup("/novnc/core/rfb.js")
    assert rfb is not None and rfb.content_type == "text/javascript; charset=utf-8"
    # noVNC's licence travels with it (MPL-2.0)
    assert b"MPL" in FILES.lookup("/novnc/LICENSE.txt").body
    assert FILES.lookup("/novnc/docs/LICENSE.MPL-2.0").content_type == "text/plain; charset=utf-8"


def test_every_module_noVNC_imports_is_served():
    """A missing file would break the page in the browser only: check the import graph here."""
    import re
    seen, todo = set(), ["/app.js"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        found = FILES.lookup(path)
        assert found is not None, f"{path} is imported but not packaged"
        base = path.rsplit("/", 1)[0]
        for target in re.findall(rb'^\s*(?:import|export)[^"\';]*?from\s+["\'](\.[^"\']+)["\']', found.body, re.M):
            parts = (base + "/" + target.decode()).split("/")
            out = []
            for part in parts:
                if part == "..":
                    out.pop()
                elif part not in (".", ""):
                    out.append(part)
            todo.append("/" + "/".join(out))
    assert len(seen) > 20


def test_page_has_no_inline_script_or_style_and_loads_nothing_from_elsewhere():
    body = FILES.lookup("/").body.decode()
    assert "<script>" not in body and "onload=" not in body and "onclick=" not in body
    assert "style=" not in body and "<style" not in body
    for name, found in FILES.files.items():
        if name.endswith((".html", ".css")) or name == "/app.js":
            assert b"http://" not in found.body and b"https://" not in found.body, name


@pytest.mark.parametrize("path", [
    "/../setup.py", "/..%2f..%2fsetup.py", "/%2e%2e/%2e%2e/static.py", "/novnc/../../static.py",
    "/novnc/core/../../../static.py", "/static.py", "/__init__.py", "//etc/passwd", "/etc/passwd",
    "/novnc/core/", "/novnc", "/novnc/", "/.%2e/server.py", "/app.js/", "/app.js%00.html",
    "/app.js;x", "/APP.JS", "/\\..\\static.py", "/novnc/core/rfb.js/..", "/webclient/index.html",
    "/" + "a" * 5000,
])
def test_hostile_paths_find_nothing(path):
    assert FILES.lookup(path) is None


def test_no_python_file_or_cache_is_served():
    assert not [name for name in FILES.files if name.endswith((".py", ".pyc")) or "__pycache__" in name]


def test_answers_carry_security_headers_and_revalidate():
    page = FILES.lookup("/")
    status, body, ctype, headers = static.answer(page, None)
    headers = dict(headers)
    assert status == 200 and body == page.body
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-cache"
    etag = headers["ETag"]
    assert static.answer(page, etag)[0] == 304
    assert static.answer(page, f'W/{etag}, "other"')[0] == 304
    assert static.answer(page, '"other"')[0] == 200


@pytest.mark.parametrize("name,ctype", [
    ("a.html", "text/html; charset=utf-8"), ("x/y.JS", "text/javascript; charset=utf-8"),
    ("LICENSE", "text/plain; charset=utf-8"), ("docs/LICENSE.MPL-2.0", "text/plain; charset=utf-8"),
    ("AUTHORS", "text/plain; charset=utf-8"), ("a.bin", "application/octet-stream"),
    ("dir.d/noext", "application/octet-stream"),
])
def test_content_types(name, ctype):
    assert static.content_type(name) == ctype
