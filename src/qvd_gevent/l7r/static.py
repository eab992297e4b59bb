"""The browser client's files (``l7r/webclient/``: the page, its script and style, and the
packaged copy of noVNC), served by the L7R on its own port (docs/protocol.md#browser-access).

A request's path is looked up in a table made from the package's own file list, never
turned into a file-system path: ``..``, ``%2e%2e``, backslashes, absolute paths and
symbolic links cannot reach a file outside the list, because nothing is ever opened by a
name the client wrote. The files are read once, on first use, through importlib.resources,
so they are served the same from a checkout, a wheel or the pex.

Every answer carries the browser client's security headers: a Content-Security-Policy
that allows scripts, styles and connections from the node itself only (no inline script,
no other site), ``nosniff``, no framing and no referrer. Files are revalidated on each
load (``Cache-Control: no-cache`` with an ETag, 304 when it matches), so an upgraded node
never serves a page with an older noVNC from the browser's cache.
"""
import hashlib
import importlib.resources

PACKAGE = "qvd_gevent.l7r"
FOLDER = "webclient"
INDEX = "index.html"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".md": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}
# noVNC's licence and authors files (LICENSE.txt, LICENSE.MPL-2.0, AUTHORS, VERSION) are text
TEXT_DEFAULT = "text/plain; charset=utf-8"
TEXT_NAMES = ("LICENSE", "AUTHORS", "VERSION", "README")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

SECURITY_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)


def content_type(name):
    base = name.rsplit("/", 1)[-1]
    dot = base.rfind(".")
    if dot > 0 and base[dot:].lower() in CONTENT_TYPES:
        return CONTENT_TYPES[base[dot:].lower()]
    if base.upper().startswith(TEXT_NAMES):
        return TEXT_DEFAULT
    return "application/octet-stream"


class StaticFile:
    __slots__ = ("body", "content_type", "etag")

    def __init__(self, body, ctype):
        self.body = body
        self.content_type = ctype
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _walk(folder, prefix=""):
    for entry in folder.iterdir():
        name = prefix + entry.name
        if entry.is_dir():
            if entry.name != "__pycache__":
                yield from _walk(entry, name + "/")
        elif entry.is_file() and not entry.name.endswith((".py", ".pyc")):
            yield name, entry


class StaticFiles:
    """``lookup(url_path)`` -> StaticFile or None. ``/`` is the page."""

    def __init__(self, root=None):
        self._root = root
        self._files = None

    def _load(self):
        root = self._root or importlib.resources.files(PACKAGE).joinpath(FOLDER)
        files = {}
        for name, entry in _walk(root):
            files["/" + name] = StaticFile(entry.read_bytes(), content_type(name))
        if "/" + INDEX in files:
            files["/"] = files["/" + INDEX]
        return files

    @property
    def files(self):
        if self._files is None:
            self._files = self._load()
        return self._files

    def lookup(self, path):
        return self.files.get(path)


def not_modified(request_etags, etag):
    """If-None-Match holds etag (or *): the browser's copy is current."""
    if not request_etags:
        return False
    for candidate in request_etags.split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate in (etag, "*"):
            return True
    return False


def answer(static_file, if_none_match):
    """(status, body, content type, headers) for a GET or HEAD of a found file."""
    headers = [("Cache-Control", "no-cache"), ("ETag", static_file.etag), *SECURITY_HEADERS]
    if not_modified(if_none_match, static_file.etag):
        return 304, b"", static_file.content_type, headers
    return 200, static_file.body, static_file.content_type, headers
