"""qvd-gevent: a QVD server node (L7R + HKD) in one gevent process."""
# The one place the version is written: setup.py reads it from here.
__version__ = "0.1.0"


def add_version_option(parser):
    """--version on a command's argparse parser, the same line for every command."""
    parser.add_argument("--version", action="version", version=f"qvd-gevent {__version__}")
