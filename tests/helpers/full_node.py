"""A whole node in the test process: HKD (process hypervisor) + L7R over TLS on 127.0.0.1,
provisioned exactly as `qvd-node demo` provisions (qvd-admin verbs; the VM's image is the
installed qvd-vm-init), against a fresh database of the test PostgreSQL."""

from qvd_gevent.node import demo

from .hkd_env import fast_hkd_settings
from .nodes import start_node


def start_full_node(tmp_path, pg_server, dbname, desktop="echo"):
    """Returns (node, vm_id, cert_path). The caller must node.stop(0)."""
    from .database import write_node_conf
    values = fast_hkd_settings(tmp_path)
    values.pop("nodename")
    values.update({
        "l7r.port": 0,
        "l7r.address": "127.0.0.1",
        "l7r.metrics.address": "",
        "internal.hkd.address_check.enabled": 0,
        "vm.network.use_dhcp": 0,
        "log.preset": "stderr",
    })
    conf = write_node_conf(tmp_path / "node.conf", pg_server, dbname, values)
    demo.provision(tmp_path, conf, desktop)
    vm_id = demo.demo_vm_id(conf)
    node = start_node(conf)
    return node, vm_id, str(tmp_path / "ssl" / "cert.pem")
