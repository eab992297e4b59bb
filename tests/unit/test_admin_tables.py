"""Tables byte-for-byte as Perl's Text::Table prints them for qvd-admin.pl.

The expected strings were produced by libtext-table-perl 1.132 with the calls
qvd-admin.pl makes: Text::Table->new(@titles); load(@rows); title; rule('-', '+'); body.
"""
from qvd_gevent.admin.tables import cell_text, render_table


def test_numbers_align_on_the_point_and_strings_go_left():
    titles = ["Id", "RAM", "Mixed", "Dec", "Title longer than data"]
    rows = [["1", "3.5", "-", "1.25", "x"], ["10000", "12000", "5", "10.5", "y"], ["7", "-", "abc", "3", "zz"]]
    assert render_table(titles, rows) == (
        "Id    RAM     Mixed Dec   Title longer than data\n"
        "------------------------------------------------\n"
        "    1     3.5 -      1.25 x                     \n"
        "10000 12000   5     10.5  y                     \n"
        "    7 -       abc    3    zz                    \n")


def test_empty_body_prints_title_and_rule():
    assert render_table(["Id", "Name"], []) == "Id Name\n-------\n"


def test_short_numbers_under_a_long_title_are_left_justified():
    assert render_table(["Virtual machines", "Running", "Blocked"], [[3, 1, 0]]) == (
        "Virtual machines Running Blocked\n"
        "--------------------------------\n"
        "3                1       0      \n")


def test_only_plain_decimals_count_as_numbers():
    assert render_table(["A", "B"], [["1e5", "0x10"], ["-3", "+4"], ["-", "-.5"]]) == (
        "A   B   \n"
        "--------\n"
        "1e5 0x10\n"
        "-3  +4  \n"
        "-   -.5 \n")


def test_host_list_shape_with_sql_metacharacters_verbatim():
    titles = ["Id", "Name", "Address ", "HKD", "Usable RAM"]
    rows = [["10000", "x'); DROP TABLE vms;--", "10.3.15.2", "-", "-"],
            ["10001", "n", "10.0.0.1", "00:01:02", "3.5"]]
    assert render_table(titles, rows) == (
        "Id    Name                   Address   HKD      Usable RAM\n"
        "----------------------------------------------------------\n"
        "10000 x'); DROP TABLE vms;-- 10.3.15.2 -        -         \n"
        "10001 n                      10.0.0.1  00:01:02 3.5       \n")


def test_quiet_drops_title_and_rule():
    assert render_table(["Id", "Login"], [[10000, "qvd"]], quiet=True) == "10000 qvd  \n"


def test_cells_stringify_like_perl():
    assert [cell_text(v) for v in (None, True, False, 4000.0, 3.25, 7, "x")] == ["-", "1", "0", "4000", "3.25", "7", "x"]
