"""The repository stands alone: it cites only its own docs/, and every docs/ citation resolves.

What the code relies on from the original QVD is written in docs/ in the project's own
words; a citation of a file beside the repository (the contract, machine notes, the
reference notes on the original, their bug numbers) would leave a reader with only the
repository stuck.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ["src", "tests", "bench", "docs", "etc", "scripts", "README.md"]
TEXT_SUFFIXES = {".py", ".md", ".sql", ".sh", ".conf", ".service", ".txt", ".cfg", ".toml", ".ini",
                 ".http", ".json", ".yml", ".yaml", ""}
THIS_FILE = Path(__file__).resolve()

# Spelled in pieces so that this file does not match itself when read as text elsewhere.
OUTSIDE = [
    (r"\.\./shared|/work/" + r"shared", "a path beside the repository"),
    (r"CONTRACT" + r"\.md", "the project contract outside the repository"),
    (r"MACHINE" + r"-NOTES", "machine notes outside the repository"),
    (r"\breference" + r"/", "a reference/ folder outside the repository"),
    (r"qvd-(?:l7r-protocol|hkd|db-admin|client-observed)" + r"\.md", "a reference file outside the repository"),
    (r"(?i)(?<![a-z0-9])q" + r"\d{1,2}(?![0-9a-z])", "a bug number of the original's list (cite docs/differences.md#<anchor>)"),
    (r"\breference" + r"\s+(?:section\s+)?\d+(?:\.\d+)*", "a section number of a reference file"),
]
DOC_CITATION = re.compile(r"(?<![\w/.-])(docs/[\w./-]+?\.md)(#[\w-]+)?")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
ANCHOR_TAG = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def scanned_files():
    for entry in SCANNED:
        path = ROOT / entry
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for p in candidates:
            if p.resolve() == THIS_FILE or "__pycache__" in p.parts or p.suffix not in TEXT_SUFFIXES:
                continue
            try:
                yield p, p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue


def slug(heading):
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(md_path):
    found, seen, fenced = set(), {}, False
    for line in md_path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        found.update(ANCHOR_TAG.findall(line))
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_the_scan_covers_the_repository():
    names = {p.relative_to(ROOT).as_posix() for p, _ in scanned_files()}
    assert "README.md" in names and "src/qvd_gevent/l7r/connect.py" in names and "docs/protocol.md" in names


@pytest.mark.parametrize("pattern,what", OUTSIDE, ids=[w for _, w in OUTSIDE])
def test_nothing_cites_a_document_outside_the_repository(pattern, what):
    rx = re.compile(pattern)
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()[:100]}"
            for p, text in scanned_files() for n, line in enumerate(text.splitlines(), 1) if rx.search(line)]
    assert not hits, f"{what} is cited; cite the docs/ page that says it instead:\n" + "\n".join(hits)


def test_every_cited_docs_page_and_anchor_exists():
    cache, broken = {}, []
    for p, text in scanned_files():
        cites = [(m.group(1), m.group(2)) for m in DOC_CITATION.finditer(text)]
        if p.suffix == ".md":
            for target in MD_LINK.findall(text):
                if "://" in target or target.startswith("mailto:"):
                    continue
                page, _, anchor = target.partition("#")
                doc = (p.parent / page).resolve() if page else p.resolve()
                if doc.suffix == ".md" and ROOT in doc.parents:
                    cites.append((doc.relative_to(ROOT).as_posix(), f"#{anchor}" if anchor else None))
        for page, anchor in cites:
            doc = ROOT / page
            if not doc.is_file():
                broken.append(f"{p.relative_to(ROOT)}: {page} does not exist")
                continue
            if anchor:
                if page not in cache:
                    cache[page] = anchors(doc)
                if anchor[1:] not in cache[page]:
                    broken.append(f"{p.relative_to(ROOT)}: {page}{anchor}: no such anchor")
    assert not broken, "broken docs/ citations:\n" + "\n".join(sorted(set(broken)))


REPO_PATH = re.compile(r"(?<![\w/.-])((?:src|tests|bench|scripts|etc)/[\w./-]+\.(?:py|sh|sql|md|conf|service))"
                       r"(?:::(\w+))?")


def test_files_and_tests_named_in_the_docs_exist():
    """docs/ and the READMEs name files and tests (the proof of a claim): they must exist."""
    pages = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md", ROOT / "bench" / "README.md"]
    missing = []
    for page in pages:
        for match in REPO_PATH.finditer(page.read_text(encoding="utf-8")):
            path, test = match.group(1), match.group(2)
            target = ROOT / path
            if not target.is_file():
                missing.append(f"{page.relative_to(ROOT)}: {path} does not exist")
            elif test and not re.search(rf"^\s*(?:async\s+)?def {test}\(", target.read_text(encoding="utf-8"), re.M):
                missing.append(f"{page.relative_to(ROOT)}: {path} has no test {test}")
    assert not missing, "\n".join(sorted(set(missing)))
