"""The browser client in a real browser: Debian's headless Chromium, driven by Selenium
through chromedriver, against a whole node (HKD + L7R over TLS, a process VM whose desktop
is the x desktop: Xvnc painted RGB (52, 101, 164) with a clock).

A person's path: open https://<node>/, type demo/demo, open the desktop, see it. The
canvas pixels noVNC drew are read back from the page. One browser for the whole module
(starting Chromium costs seconds); each test gets its own node and database.

As root (CI) the VM is confined as any process VM: the test checks that Xvnc and the
clock run under the VM's own uid in its own pid namespace.

The node's self-signed certificate is trusted by its public key
(--ignore-certificate-errors-spki-list), not by turning certificate checks off, so the
page is a secure context as on a real node with a real certificate.
"""
import base64
import hashlib
import os
import shutil

import gevent
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from helpers.full_node import start_full_node
from helpers.nodes import wait_for
from helpers.vm_probe import descendants, process_uids

from qvd_gevent.db import runtime
from qvd_gevent.node.demo import DEMO_PASSWORD, DEMO_USER

pytestmark = pytest.mark.slow

BACKGROUND = (52, 101, 164)
NEEDED = ("chromium", "chromedriver", "Xvnc", "xsetroot", "xclock")

COUNT_BACKGROUND = """
const canvas = document.querySelector('#screen canvas');
if (!canvas || canvas.width === 0) return null;
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
let match = 0;
for (let i = 0; i < data.length; i += 4) {
    if (data[i] === arguments[0] && data[i + 1] === arguments[1] && data[i + 2] === arguments[2]) match++;
}
return [match, canvas.width * canvas.height];
"""


def spki_hash(cert_path):
    with open(cert_path, "rb") as fh:
        cert = x509.load_pem_x509_certificate(fh.read())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the browser test needs {', '.join(missing)} (scripts/install-test-deps.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    keys = []     # public keys of the nodes' certificates, added per test (a new browser session)
    profile = tmp_path_factory.mktemp("chromium")

    def start(cert_path):
        keys.append(spki_hash(cert_path))
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={profile}",
                     "--ignore-certificate-errors-spki-list=" + ",".join(keys)):
            options.add_argument(flag)
        return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    drivers = []

    def browser(cert_path):
        # one Chromium at a time: a new node's key needs a new start; the profile is reused
        while drivers:
            drivers.pop().quit()
        drivers.append(start(cert_path))
        return drivers[-1]
    yield browser
    while drivers:
        drivers.pop().quit()


@pytest.fixture
def x_node(tmp_path, pg_server, fresh_db_name):
    node, vm_id, cert = start_full_node(tmp_path, pg_server, fresh_db_name, desktop="x")
    yield node, vm_id, cert
    node.stop(0)


def state(driver):
    return driver.execute_script("return document.body.dataset.state")


def log_in_and_open(driver, port, password=DEMO_PASSWORD):
    from selenium.webdriver.common.by import By
    driver.get(f"https://127.0.0.1:{port}/")
    assert driver.title == "QVD"
    driver.find_element(By.ID, "login").send_keys(DEMO_USER)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login-button").click()
    wait_for(lambda: state(driver) == "list", 20, "the desktop list")
    assert driver.find_element(By.ID, "password").get_attribute("value") == ""     # the page keeps no password
    driver.find_element(By.CSS_SELECTOR, "#vms li button.open").click()


def background_share(driver):
    counted = driver.execute_script(COUNT_BACKGROUND, *BACKGROUND)
    return None if not counted else counted[0] / counted[1]


def test_a_person_logs_in_and_sees_the_desktop(chromium, x_node, tmp_path):
    node, vm_id, cert = x_node
    driver = chromium(cert)
    log_in_and_open(driver, node.l7r.port)
    wait_for(lambda: state(driver) == "connected", 90, "the desktop connected (VM start, Xvnc, noVNC)")
    share = wait_for(lambda: (background_share(driver) or 0) > 0.8 and background_share(driver), 30,
                     "the desktop's background colour in the canvas")
    assert share < 0.999                  # and something else is drawn: the clock
    assert runtime.session_row(node.db, vm_id)[2] == "connected"
    if os.geteuid() == 0:
        assert_desktop_confined(node, vm_id)
    # the page talked only to the node: no console error about CSP or blocked loads
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]
    assert not errors, errors
    tokens = driver.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]")
    assert tokens == [0, 0, ""]
    driver.save_screenshot(str(tmp_path / "browser.png"))      # for a person who looks at a failed run


def assert_desktop_confined(node, vm_id):
    """Xvnc and the clock run inside the VM's confinement (docs/hkd.md#vm-confinement): the
    VM's own uid, the VM's pid namespace, not the node's."""
    [(vm_pid,)] = node.db.query("SELECT vm_pid FROM vm_runtimes WHERE vm_id = %s", (vm_id,))
    inside = descendants(vm_pid)
    desktop = {pid: name for pid, name in inside.items() if name in ("Xvnc", "xclock")}
    assert sorted(desktop.values()) == ["Xvnc", "xclock"], inside
    uid = node.cfg.get_int("vm.uid.base") + vm_id
    own_namespace = os.readlink("/proc/self/ns/pid")
    for pid in desktop:
        assert process_uids(pid) == (uid,) * 4
        assert os.readlink(f"/proc/{pid}/ns/pid") != own_namespace


def test_a_wrong_password_is_refused_on_the_page(chromium, x_node):
    from selenium.webdriver.common.by import By
    node, vm_id, cert = x_node
    driver = chromium(cert)
    driver.get(f"https://127.0.0.1:{node.l7r.port}/")
    driver.find_element(By.ID, "login").send_keys(DEMO_USER)
    driver.find_element(By.ID, "password").send_keys("wrong")
    driver.find_element(By.ID, "login-button").click()
    wait_for(lambda: "Wrong user or password" in driver.find_element(By.ID, "login-error").text, 20, "the refusal")
    assert state(driver) == "login"


def test_native_and_browser_sessions_take_each_other_over(chromium, x_node):
    from helpers.rfb import RfbViewer
    from helpers.web_client import native_connect
    from selenium.webdriver.common.by import By
    node, vm_id, cert = x_node
    port = node.l7r.port
    driver = chromium(cert)
    log_in_and_open(driver, port)
    wait_for(lambda: state(driver) == "connected", 90, "the browser session")

    native = native_connect(port, cert, vm_id)          # a native client takes the VM over
    wait_for(lambda: state(driver) == "login", 20, "the browser session closed by the takeover")
    assert "contending session" in driver.find_element(By.ID, "login-error").text
    assert driver.execute_script("return document.body.dataset.closeCode") == "4000"
    viewer = RfbViewer(native).handshake()              # the native client now has the desktop
    assert viewer.frame().get(BACKGROUND, 0) > 0.8 * viewer.width * viewer.height

    log_in_and_open(driver, port)                       # and the browser takes it back
    wait_for(lambda: state(driver) == "connected", 60, "the browser session again")
    native.settimeout(15)
    with gevent.Timeout(20):
        while True:
            try:
                if not native.recv(65536):
                    break
            except OSError:
                break
    wait_for(lambda: (background_share(driver) or 0) > 0.8, 30, "the desktop in the browser again")
    native.close()


def test_a_desktop_that_cannot_be_shown_says_why_on_the_page(chromium, tmp_path, pg_server, fresh_db_name):
    """A failed connect reaches the page over the open WebSocket (close 4503 and the reason),
    and the page shows it: here a VM whose desktop is nx."""
    from selenium.webdriver.common.by import By
    node, vm_id, cert = start_full_node(tmp_path, pg_server, fresh_db_name, desktop="nx")
    try:
        driver = chromium(cert)
        log_in_and_open(driver, node.l7r.port)
        wait_for(lambda: state(driver) == "login", 90, "the page back at the login with the reason")
        assert driver.execute_script("return document.body.dataset.closeCode") == "4503"
        assert "The nx desktop cannot be shown in a browser" in driver.find_element(By.ID, "login-error").text
    finally:
        node.stop(0)
