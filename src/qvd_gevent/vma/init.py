"""qvd-vm-init: the init of `process` and `netns` VMs (docs/hkd.md#process-and-netns-vms).

Environment (set by the hypervisor): QVD_VM_ID, QVD_VM_NAME, QVD_VM_ADDRESS (bind
address, default 0.0.0.0), optionally QVD_VMA_PORT and QVD_X_PORT (default 3030 and
4100), QVD_VM_DESKTOP (echo or nx), QVD_PROP_QVD_VM_DESKTOP (the VM property
qvd.vm.desktop as the process hypervisor exports properties) and QVD_VMA_CONFIG (a
vma.conf). QVD_VMA_SECRET is the agent key every caller must present (the VMA takes it
out of the environment at start); without it the init refuses to start unless
QVD_VMA_UNAUTHENTICATED=1 (the node's vm.vma.legacy_unauthenticated) says to serve
everyone, as the original VMA did.

It runs the VMA in this same process (no second interpreter per VM) with poweroff
meaning "this VM's init exits". The desktop: QVD_VM_DESKTOP when set, else
QVD_PROP_QVD_VM_DESKTOP; otherwise it is chosen at the first x_start from
qvd.vm.desktop in the params the L7R sends (VM properties travel there too; nx ->
nxagent, anything else -> the echo desktop). SIGTERM and SIGINT stop the VMA, exit 0.
"""
import argparse
import logging
import os
import sys

from .. import add_version_option
from .server import build_parser, run


_HELP = """\
The init of a `process` or `netns` VM: the hypervisor runs it as the VM's disk image, and
it runs the QVD VM agent (SimpleRPC on the VMA port) and the desktop (a line echo, or
nxagent) until the agent's poweroff or SIGTERM.

It takes its settings from the environment, which the hypervisor sets:
  QVD_VM_ID, QVD_VM_NAME    the VM (for the log)
  QVD_VM_ADDRESS            address to listen on (default 0.0.0.0)
  QVD_VMA_PORT, QVD_X_PORT  agent and display ports (default 3030 and 4100)
  QVD_VM_DESKTOP            echo, nx or x (else the VM property qvd.vm.desktop decides)
  QVD_VMA_CONFIG            a vma.conf
  QVD_VMA_SECRET            the agent key every caller must present (made at each VM start)
  QVD_VMA_UNAUTHENTICATED   1: no key, serve everyone (as the original VMA)

Register it as a disk image: qvd-admin di add path=$(which qvd-vm-init) osf=NAME
"""


def build_init_parser():
    """qvd-vm-init's own command line: it has no options besides help and version."""
    return argparse.ArgumentParser(prog="qvd-vm-init", description=_HELP,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def vma_args_from_env(env):
    # QVD_VM_DESKTOP wins; then the VM property qvd.vm.desktop as the process hypervisor
    # passes properties (QVD_PROP_QVD_VM_DESKTOP); else decided at the first x_start.
    desktop = (env.get("QVD_VM_DESKTOP", "").strip() or env.get("QVD_PROP_QVD_VM_DESKTOP", "").strip()
               or "auto").lower()
    argv = ["--address", env.get("QVD_VM_ADDRESS", "").strip() or "0.0.0.0",
            "--desktop", desktop, "--poweroff-exits"]
    if env.get("QVD_X_PORT"):
        argv += ["--x-port", env["QVD_X_PORT"]]
    if env.get("QVD_VMA_CONFIG"):
        argv += ["--config", env["QVD_VMA_CONFIG"]]
    if env.get("QVD_VMA_PORT"):
        argv += ["--port", env["QVD_VMA_PORT"]]
    if not env.get("QVD_VMA_SECRET") and env.get("QVD_VMA_UNAUTHENTICATED", "").strip() == "1":
        argv += ["--unauthenticated"]
    return argv


def main(argv=None):
    parser = build_init_parser()
    add_version_option(parser)
    parser.parse_args(sys.argv[1:] if argv is None else argv)
    vma_args = vma_args_from_env(os.environ)
    desktop = vma_args[vma_args.index("--desktop") + 1]
    if desktop not in ("echo", "nx", "x", "auto"):
        print(f"qvd-vm-init: QVD_VM_DESKTOP must be echo, nx or x, not {desktop!r}", file=sys.stderr)
        sys.exit(2)
    if not os.environ.get("QVD_VMA_SECRET") and "--unauthenticated" not in vma_args:
        print("qvd-vm-init: no agent key: QVD_VMA_SECRET is not set (QVD_VMA_UNAUTHENTICATED=1 serves "
              "without one, as the original VMA)", file=sys.stderr)
        sys.exit(2)
    from .server import patch_for_vma
    patch_for_vma()
    vm_id = os.environ.get("QVD_VM_ID", "?")
    vm_name = os.environ.get("QVD_VM_NAME", "")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s vm {vm_id} %(name)s %(levelname)s %(message)s")
    logging.getLogger("qvd.vm-init").info("init of VM %s (%s), pid %d", vm_id, vm_name, os.getpid())
    sys.exit(run(build_parser(prog="qvd-vm-init").parse_args(vma_args), prog="qvd-vm-init"))


if __name__ == "__main__":
    main()
