"""Tables as qvd-admin.pl prints them with Perl's Text::Table (default "auto" alignment).

What Text::Table does with ``Text::Table->new(@titles)`` and no explicit separators
(checked against libtext-table-perl 1.132):
- columns are joined by one space; every line is padded to the full width;
- a cell that looks like a number (``/^-?\\d+\\.?\\d*$/``) is aligned on its decimal point
  with the other numbers of its column; other cells are left-aligned; the two groups
  are then left-justified together into the body width of the column;
- the column is as wide as the wider of its title and its body; titles are left-aligned;
- ``rule('-', '+')`` puts ``+`` only at declared separators; qvd-admin.pl declares none,
  so the rule is all dashes, as wide as the title line.
``-q`` drops the title and the rule. NULL cells are printed as ``-`` by the callers.
"""
import re

_NUMBER = re.compile(r"^-?\d+\.?\d*$")


def is_number(text):
    return bool(_NUMBER.match(text))


def cell_text(value):
    """How Perl would stringify a cell: undef -> '-', booleans -> 1/0, floats like %.15g."""
    if value is None:
        return "-"
    if value is True:
        return "1"
    if value is False:
        return "0"
    if isinstance(value, float):
        return f"{value:.15g}"
    return str(value)


def _align_body(cells):
    """Text::Aligner 'auto': numbers aligned on the point, others left; then left-justified."""
    nums = [c for c in cells if is_number(c)]
    left_w = right_w = 0
    for c in nums:
        point = (c + ".").index(".")
        left_w = max(left_w, point)
        right_w = max(right_w, len(c) - point)
    other_w = max((len(c) for c in cells if not is_number(c)), default=0)
    out = []
    for c in cells:
        if is_number(c):
            point = (c + ".").index(".")
            out.append(" " * (left_w - point) + c + " " * (right_w - (len(c) - point)))
        else:
            out.append(c)
    width = max([left_w + right_w if nums else 0, other_w])
    return [c.ljust(width) for c in out], width


def render_table(titles, rows, quiet=False):
    """Return the table as text (lines ending in newline)."""
    rows = [[cell_text(v) for v in row] for row in rows]
    columns = []
    for i, title in enumerate(titles):
        cells, body_w = _align_body([row[i] for row in rows])
        width = max(len(title), body_w)
        columns.append(([title.ljust(width)], [c.ljust(width) for c in cells]))
    lines = []
    if not quiet:
        title_line = " ".join(col[0][0] for col in columns)
        lines.append(title_line)
        lines.append("-" * len(title_line))
    for r in range(len(rows)):
        lines.append(" ".join(col[1][r] for col in columns))
    return "".join(line + "\n" for line in lines)
