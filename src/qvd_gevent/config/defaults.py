"""Every configuration key the node reads: name, default, type and one-line meaning.

Keys, defaults and meanings follow the original QVD (Config/Core/Defaults.pm); where we
add a key of our own it says so. ``None`` as default means "no default": reading it
without a value is an error naming the key.

Types: str, int, float, bool (0/1, yes/no, true/false), list (comma separated),
ip (dotted IPv4), netmask (dotted or prefix length), path, octal.
"""
from collections import namedtuple

Key = namedtuple("Key", "name default type meaning")

# Keys read only from node.conf + defaults, never from the configs table.
BOOTSTRAP_PREFIXES = ("database.", "nodename", "log.", "internal.database.client.",
                      "path.run", "hkd.pid_file", "hkd.user.umask", "hkd.as_")

_TABLE = [
    # --- identity and database (bootstrap: node.conf only) ---
    ("nodename", None, "str", "name of this node; must equal hosts.name"),
    ("database.host", "localhost", "str", "PostgreSQL host (or a unix socket directory); a comma-separated "
     "list names a primary and its standbys, and the node uses whichever is read-write"),
    ("database.port", "", "str", "PostgreSQL port, or one per host of database.host (comma-separated); "
     "empty means the driver default"),
    ("database.name", "qvd", "str", "database name"),
    ("database.user", "qvd", "str", "database user"),
    ("database.password", "", "str", "database password"),
    ("internal.database.client.connect.timeout", 20, "int", "seconds to wait for a new DB connection, "
     "per server of database.host"),
    ("internal.database.client.statement.timeout", 30, "int", "ours: seconds before a statement is cancelled"),
    ("internal.database.client.socket.keepidle", 20, "int", "TCP keepalive idle seconds on DB sockets"),
    ("internal.database.client.socket.keepintvl", 5, "int", "TCP keepalive interval on DB sockets"),
    ("internal.database.client.socket.keepcnt", 4, "int", "TCP keepalive probes on DB sockets"),
    ("internal.database.pool.size", 10, "int", "connections in the node's pool (ours: one process serves all greenlets)"),
    ("internal.database.pool.connection.timeout", 10, "int", "seconds a greenlet waits for a free pooled connection"),
    ("internal.database.pool.connection.global_timeout", 400, "int", "seconds without a DB before the HKD gives up"),
    ("internal.database.pool.connection.delay", 10, "int", "seconds between DB reconnect attempts"),
    ("internal.database.pool.connection.retries", 100, "int", "DB reconnect attempts"),
    ("internal.database.transaction.retries", 5, "int", "ours: retries of a transaction on serialization failure"),
    # --- paths ---
    ("path.run", "/var/run/qvd", "path", "runtime files (pid, locks, dhcp hosts file)"),
    ("path.log", "/var/log/qvd", "path", "log folder"),
    ("path.tmp", "/var/tmp", "path", "temporary files"),
    ("path.storage.root", "/var/lib/qvd/storage", "path", "root of images, overlays and homes"),
    ("path.storage.staging", "${path.storage.root}/staging", "path", "uploaded images"),
    ("path.storage.images", "${path.storage.root}/images", "path", "disk images in use"),
    ("path.storage.overlays", "${path.storage.root}/overlays", "path", "per-VM qcow2 overlays"),
    ("path.storage.homes", "${path.storage.root}/homes", "path", "per-VM user disks"),
    ("path.l7r.ssl", "${path.run}/l7r/ssl", "path", "where the SSL material from ssl_configs is written"),
    ("path.l7r.ssl.key", "${path.l7r.ssl}/key.pem", "path", "L7R private key file"),
    ("path.l7r.ssl.cert", "${path.l7r.ssl}/cert.pem", "path", "L7R certificate file"),
    ("path.l7r.ssl.ca", "${path.l7r.ssl}/ca.pem", "path", "CA for client certificates"),
    ("path.l7r.ssl.crl", "${path.l7r.ssl}/crl.pem", "path", "CRL for client certificates"),
    ("path.serial.captures", "${path.tmp}/qvd", "path", "serial console captures"),
    # --- logging (bootstrap) ---
    ("log.filename", "${path.log}/qvd.log", "path", "log file when log.preset=file"),
    ("log.level", "INFO", "str", "FATAL ERROR WARN INFO DEBUG TRACE"),
    ("log.preset", "stderr", "str", "file, stdout or stderr (ours defaults to stderr; systemd collects it)"),
    ("log.format", "text", "str", "ours: text (one line per event) or json (one JSON object per line)"),
    # --- L7R ---
    ("l7r.use_ssl", True, "bool", "serve TLS on the L7R port"),
    ("l7r.port", 8443, "int", "L7R listen port"),
    ("l7r.address", "*", "str", "L7R bind address, * for all"),
    ("l7r.client.cert.require", False, "bool", "require a client certificate signed by the CA"),
    ("l7r.options.SSL_version", "TLSv1_2:!SSLv3:!SSLv2:!TLSv1", "str", "lowest TLS version (TLS 1.2 or 1.3 only)"),
    ("l7r.options.SSL_cipher_list", "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!MD5:!DSS", "str",
     "OpenSSL cipher list for TLS 1.2 (suites without forward secrecy are always removed from it)"),
    ("l7r.workers", "auto", "str", "ours: L7R processes of qvd-node on one listening port, beside the process that "
     "runs the HKD: a number (0 or 1: the L7R runs in the node's own process), or auto: one per core, at most 8 "
     "(each has its own PostgreSQL connections and LISTEN backend; README Operations)"),
    ("l7r.tls.session_tickets", 0, "int", "ours: TLS 1.3 session tickets sent after each full handshake (QVD clients "
     "never resume a session, and each ticket costs an encryption per connection)"),
    ("l7r.auth.plugins", "", "list", "authentication plugins before the tail list"),
    ("l7r.auth.plugins.head", "", "list", "authentication plugins tried first"),
    ("l7r.auth.plugins.tail", "default", "list", "authentication plugins tried last"),
    ("l7r.auth.plugin.default.salt", "qvd1234", "str", "salt of legacy SHA-256 password hashes"),
    ("l7r.auth.plugin.default.separators", "@#", "str", "characters splitting login and tenant"),
    ("l7r.auth.plugin.default.tenant", "default", "str", "tenant of a login without separator"),
    # --- authentication plugins (README "Directory login") ---
    ("l7r.auth.plugin.totp.token_size", 6, "int", "TOTP: digits of the one-time code typed after the password"),
    ("l7r.auth.plugin.totp.interval", 30, "int", "TOTP: seconds of one time step"),
    ("l7r.auth.plugin.totp.t0", 0, "int", "TOTP: Unix time at which step 0 starts"),
    ("l7r.auth.plugin.totp.leeway", 1, "int", "TOTP: past time steps whose code is still accepted"),
    ("l7r.auth.plugin.totp.leeway_before", 0, "int", "TOTP: future time steps whose code is accepted (client clocks ahead)"),
    ("auth.ldap.host", None, "str", "ldap: directory server, host[:port], ldap://host[:port] or ldaps://host[:port] (required)"),
    ("auth.ldap.base", None, "str", "ldap: search base of the user entries (required)"),
    ("auth.ldap.filter", "(uid=%u)", "str", "ldap: search filter; %u is the login, escaped as a filter value"),
    ("auth.ldap.scope", "base", "str", "ldap: search scope: base, one or sub"),
    ("auth.ldap.deref", "never", "str", "ldap: alias dereferencing: never, search, find or always"),
    ("auth.ldap.binddn", "", "str", "ldap: DN bound as before the search (%u: the login, DN-escaped); empty: anonymous"),
    ("auth.ldap.bindpass", "", "str", "ldap: password of auth.ldap.binddn; empty: the user's own password"),
    ("auth.ldap.userbindpattern", "", "str", "ldap: DN tried first with the user's password (%u: the login, DN-escaped); empty: no such try"),
    ("auth.ldap.racf_allowregex", "", "str", "ldap: a refused bind whose server message matches this regex still logs in (RACF expired passwords)"),
    ("auth.ldap.name.normalize", False, "bool", "ldap: the entry's uid becomes the login (and the desktop user name)"),
    ("auth.ldap.normalize.name", False, "bool", "ldap: older spelling of auth.ldap.name.normalize"),
    ("auth.ldap.home.set", False, "bool", "ldap: the entry's homeDirectory becomes the desktop user's home"),
    ("auth.ldap.starttls", False, "bool", "ours: ldap: StartTLS on ldap:// connections (the certificate is checked)"),
    ("auth.ldap.tls.ca", "", "path", "ours: ldap: CA file that signs the directory's certificate; empty: the system's CAs"),
    ("auth.ldap.timeout.connect", 5, "float", "ours: ldap: seconds to open a connection to the directory"),
    ("auth.ldap.timeout", 10, "float", "ours: ldap: seconds one login may wait on the directory before it gets 503 retry later"),
    ("auth.ldap.pool.size", 10, "int", "ours: ldap: directory connections kept open, and logins talking to the directory at once"),
    ("auth.auto.osf_id", None, "int", "auto: OSF of the VM given to a user at first login (required)"),
    ("auth.auto.di_tag", "default", "str", "auto: DI tag of that VM"),
    ("auth.auto.max_vms", 5, "int", "auto: VM names <login>-1 .. <login>-N tried before giving up"),
    ("l7r.auth.throttle.max_failures", 5, "int", "ours: failed logins from one address (any login, or one login) "
     "before that address, or that login at that address, is throttled"),
    ("l7r.auth.throttle.max_failures_per_login", 50, "int", "ours: failed logins of one login from all "
     "addresses before that login is throttled everywhere (against guessing spread over many addresses)"),
    ("l7r.auth.concurrent_per_address", 1, "int", "ours: password hashes one source address may have running "
     "at once (so a flood from one address never holds every hashing thread; raise it, or "
     "l7r.auth.hash.threads, for many users behind one NAT address)"),
    ("l7r.auth.waiting_per_address", 100, "int", "ours: password hashes of one source address that may wait "
     "behind those; more get 429 at once"),
    ("l7r.auth.hash.threads", 2, "int", "ours: threads hashing passwords (scrypt takes 16 MB each)"),
    ("l7r.auth.hash.queue", 32, "int", "ours: password hashes waiting or running in the node; beyond, a login "
     "gets 503 retry later instead of waiting in an unbounded queue"),
    ("l7r.auth.throttle.window", 300, "int", "ours: seconds failures are remembered and a throttle lasts"),
    ("l7r.auth.throttle.burst", 10, "int", "ours: identical failed credentials from one address within this many seconds count once (the original client retries 5 times)"),
    ("l7r.loadbalancer.plugin", "default", "str", "load balancer plugin"),
    ("l7r.loadbalancer.plugin.default.weight.ram", 1.0, "float", "weight of usable RAM in node choice"),
    ("l7r.loadbalancer.plugin.default.weight.cpu", 1.0, "float", "weight of usable CPU in node choice"),
    ("l7r.loadbalancer.plugin.default.weight.random", 1.0, "float", "random part of node choice"),
    ("l7r.timeout.request", 30, "int", "ours: seconds a client has to send one whole request (and to take an answer once a write to it waits)"),
    ("l7r.timeout.idle", 300, "int", "ours: seconds an idle keep-alive connection is kept once it has logged in"),
    ("l7r.timeout.idle.unauthenticated", 10, "int", "ours: seconds an idle keep-alive connection that has not "
     "logged in (yet) is kept"),
    ("l7r.limits.request_line", 8190, "int", "ours: longest request line accepted (414 beyond)"),
    ("l7r.limits.headers", 16384, "int", "ours: largest header block accepted (431 beyond)"),
    ("l7r.limits.connections", 20000, "int", "ours: most client connections held at once"),
    ("l7r.limits.connections_per_address", 256, "int", "ours: most connections one source address may hold "
     "before they become sessions (TLS handshake, requests); more are closed at once"),
    ("l7r.web.enable", True, "bool", "ours: serve the browser client (page, web login, WebSocket) on the L7R port"),
    ("l7r.web.token.lifetime", 120, "int", "ours: seconds a web login's single-use desktop token is valid"),
    ("l7r.web.max_message", 262144, "int", "ours: longest WebSocket message from a browser, in bytes (close 1009 beyond)"),
    ("l7r.web.origins", "", "str", "ours: comma-separated extra origins allowed for the browser client "
     "(https://name[:port] of a balancer in front); the node's own is always allowed"),
    ("l7r.listen.backlog", 4096, "int", "ours: listen queue length (the kernel caps it at net.core.somaxconn); gevent's 128 drops SYNs in a connection flood"),
    ("l7r.drain.grace", 30, "int", "ours: seconds live sessions get to finish on SIGTERM"),
    ("l7r.metrics.address", "127.0.0.1:8444", "str", "ours: host:port of the Prometheus /metrics endpoint; empty disables"),
    ("l7r.token.lifetime", 86400, "int", "seconds a token from create_auth_token lives"),
    ("internal.l7r.timeout.takeover", 30, "int", "seconds to take a session over from another client"),
    ("internal.l7r.poll_time.vm", 2, "int", "seconds between session takeover attempts"),
    ("internal.l7r.timeout.vm_start", 270, "int", "seconds to wait for a VM to be running"),
    ("internal.l7r.timeout.vm_stop", 270, "int", "seconds to wait for a VM to stop"),
    ("internal.l7r.retry.x_start", 20, "int", "retries of the VMA x_start call"),
    ("internal.l7r.poll_time.x", 1, "float", "seconds between x_start retries and x_state polls"),
    ("internal.l7r.timeout.x_start", 10, "int", "seconds to wait for the X session to listen"),
    ("internal.l7r.timeout.vma", 4, "int", "VMA RPC I/O timeout"),
    ("internal.l7r.short_session", 120, "int", "sessions shorter than this count as short"),
    # --- HKD ---
    ("hkd.pid_file", "${path.run}/qvd-hkd.pid", "path", "pid file of the node"),
    ("hkd.user.umask", "0022", "octal", "umask of the node"),
    ("internal.hkd.lock.path", "${path.run}/hkd.lock", "path", "single-instance lock file"),
    ("internal.hkd.cluster.node.timeout", 45, "int", "heartbeat age after which the other nodes call a node lost "
     "and start its VMs elsewhere (original: 600); at least ticker.timeout + fence.kill_time"),
    ("internal.hkd.agent.ticker.timeout", 30, "int", "seconds without a written heartbeat after which the node "
     "fences itself: kills its VMs and stops (original: 450)"),
    ("internal.hkd.agent.ticker.delay", 5, "int", "heartbeat period (original: 120); at most half of ticker.timeout"),
    ("internal.hkd.fence.kill_time", 10, "int", "ours: seconds a fencing node is given to kill its VMs; the other "
     "nodes wait this much longer than ticker.timeout before they call it lost"),
    ("internal.hkd.agent.command_handler.delay", 60, "int", "host command poll (safety net behind NOTIFY)"),
    ("internal.hkd.agent.vm_command_handler.delay", 61, "int", "vm_cmd poll (safety net behind NOTIFY)"),
    ("internal.hkd.agent.l7rkiller.delay", 61, "int", "user_cmd abort poll (safety net behind NOTIFY)"),
    ("internal.hkd.agent.expiration_monitor.delay", 3600, "int", "VM expiration check period"),
    ("internal.hkd.agent.token_sweep.delay", 300, "int", "ours: seconds between purges of expired tokens and "
     "of stored login parameters no token refers to"),
    ("internal.hkd.agent.cluster_monitor.delay", 5, "int", "lost-node check period (original: 120)"),
    ("internal.hkd.agent.cluster_monitor.long_delay", 45, "int", "first lost-node check and after DB trouble: "
     "the other nodes get this long to write a heartbeat again (original: 600)"),
    ("internal.hkd.agent.cluster_monitor.fuzzy_delay", 2, "int", "random extra seconds on the cluster check "
     "(original: 30)"),
    ("internal.hkd.agent.config.delay", 10, "int", "retry of a failed config reload"),
    ("internal.hkd.agent.rpc.timeout", 3, "int", "VMA RPC timeout"),
    ("internal.hkd.agent.rpc.retry.count", 3, "int", "VMA RPC retries"),
    ("internal.hkd.agent.rpc.retry.delay", 5, "int", "seconds between VMA RPC retries"),
    ("internal.hkd.agent.dhcpdhandler.delay", 2, "int", "first dnsmasq restart delay (doubles up to 60 s)"),
    ("internal.hkd.stopping.l7rs.timeout", 300, "int", "seconds to let sessions end on node stop"),
    ("internal.hkd.stopping.vms.timeout", 300, "int", "seconds to let VMs stop on node stop"),
    ("internal.hkd.killing.vms.retry.timeout", 100, "int", "seconds between kill rounds on node stop"),
    ("internal.hkd.l7r.timeout.on_state.killing", 10, "int", "seconds from SIGTERM to SIGKILL"),
    ("internal.hkd.max_heavy", 10, "int", "VMs starting or stopping at once"),
    ("internal.hkd.db.retries", 100, "int", "ours: retries of an HKD transaction on serialization failure (the original retries up to 1000)"),
    ("internal.hkd.address_check.enabled", True, "bool", "check hosts.address is local and in the node range"),
    ("internal.hkd.hypervisor_list", "kvm,lxc,netns,process", "list", "accepted vm.hypervisor values"),
    ("internal.hkd.vmhandler.vma.failed.max_count.on.starting", 40, "int", "VMA ping failures before a starting VM is dead"),
    ("internal.hkd.vmhandler.vma.failed.max_count.on.running", 10, "int", "VMA ping failures before a running VM is dead"),
    ("internal.hkd.vmhandler.vma.failed.max_time.on.starting", 180, "int", "seconds without a good ping before a starting VM is dead"),
    ("internal.hkd.vmhandler.vma.failed.max_time.on.running", 320, "int", "seconds without a good ping before a running VM is dead"),
    ("internal.hkd.vmhandler.vma_monitor.delay.after.error", 10, "float", "seconds to the next VMA ping after a failure"),
    ("internal.hkd.vmhandler.vma_monitor.delay.after.ok", 120, "float", "seconds to the next VMA ping after success"),
    ("internal.hkd.vmhandler.vma_monitor.delay.starting", 0.5, "float", "ours: ping period while a VM boots"),
    ("internal.hkd.vmhandler.vma_monitor.delay.starting.fast", 0.05, "float", "ours: ping period in a booting VM's first seconds"),
    ("internal.hkd.vmhandler.vma_monitor.starting.fast_period", 5, "float", "ours: seconds the fast boot-time ping period lasts"),
    ("internal.hkd.timeout.on_state.stopping.shutdown", 180, "int", "seconds for a VM's graceful poweroff"),
    ("internal.hkd.timeout.on_state.stopping.stop", 180, "int", "seconds for a VM to die after SIGTERM/destroy"),
    ("internal.hkd.timeout.on_state.zombie.reap", 120, "int", "seconds to reap a zombie VM"),
    ("internal.hkd.timeout.on_state.zombie.delaying", 60, "int", "seconds between zombie reap attempts"),
    ("internal.vm.debug.enable", False, "bool", "a dead VMA puts the VM in debugging instead of stopping it"),
    # --- VMs ---
    ("vm.hypervisor", "kvm", "str", "kvm, lxc, netns or process"),
    ("vm.kvm.allow_tcg", True, "bool", "ours: use qemu TCG where KVM cannot run guests"),
    ("vm.kvm.virtio", True, "bool", "virtio NIC and disks"),
    ("vm.kvm.cpus", 2, "int", "vCPUs of a KVM guest"),
    ("vm.kvm.kernel", "", "path", "ours: boot this kernel directly (tests, tiny guests)"),
    ("vm.kvm.initrd", "", "path", "ours: initrd for vm.kvm.kernel"),
    ("vm.kvm.cmdline", "console=ttyS0", "str", "ours: kernel command line for vm.kvm.kernel"),
    ("vm.libvirt.uri.kvm", "qemu:///system", "str", "ours: libvirt URI for kvm"),
    ("vm.libvirt.uri.lxc", "lxc:///", "str", "ours: libvirt URI for lxc"),
    ("vm.kvm.accel", "auto", "str", "ours: kvm, tcg, or auto (kvm only if a probe guest really runs on /dev/kvm)"),
    ("internal.hkd.kvm.probe.timeout", 3, "int", "ours: seconds the /dev/kvm probe guest may take before KVM counts as broken"),
    ("internal.hkd.libvirt.keepalive.interval", 5, "int", "ours: seconds between keepalive probes on a remote libvirt connection"),
    ("internal.hkd.libvirt.keepalive.count", 3, "int", "ours: unanswered keepalive probes before the libvirt connection counts as dead"),
    ("internal.hkd.libvirt.state_check.interval", 5, "int", "ours: seconds between domain state checks while waiting for an exit (lifecycle events are the fast path)"),
    ("vm.lxc.init", "/sbin/init", "str", "ours: init of an lxc container, inside its rootfs"),
    ("path.storage.basefs", "${path.storage.root}/basefs", "path", "unpacked LXC images"),
    ("path.storage.rootfs", "${path.storage.root}/rootfs", "path", "LXC containers' root filesystems (mount points)"),
    ("path.storage.overlayfs", "${path.storage.root}/overlayfs", "path", "LXC containers' overlay upper and work dirs"),
    ("vm.overlay.persistent", False, "bool", "keep a VM's overlay between runs"),
    ("vm.network.bridge", "qvdnet", "str", "bridge the VMs are attached to"),
    ("vm.network.ip.start", "10.0.0.100", "ip", "first VM address; below it are node addresses"),
    ("vm.network.netmask", "255.255.0.0", "netmask", "VM network mask, dotted or prefix length"),
    ("vm.network.gateway", "", "str", "gateway handed to VMs by DHCP"),
    ("vm.network.dns_server", "", "str", "DNS server handed to VMs (3.x key; ours passes it to dnsmasq)"),
    ("vm.network.domain", "", "str", "dnsmasq --domain"),
    ("vm.network.use_dhcp", True, "bool", "run dnsmasq for the VMs"),
    ("vm.network.mac.prefix", "54:52:00", "str", "MAC prefix; the rest is the VM IP's last three octets"),
    ("vm.network.setup", False, "bool", "ours: create the bridge, forwarding and NAT at start, remove at stop"),
    ("vm.network.nat.public_address", "", "str", "ours: address clients reach (the seed's DNAT/SNAT rules)"),
    ("vm.network.firewall.nat.iface", "", "str", "MASQUERADE VM traffic out of this interface"),
    ("internal.vm.network.firewall.enable", True, "bool", "filter the VMs' network (nftables): the switches "
     "below, and each VM only with its own MAC and address"),
    ("internal.vm.network.firewall.protect_host", True, "bool", "VMs reach nothing on the node nor on other "
     "nodes' addresses but DHCP (and DNS when dnsmasq serves it)"),
    ("internal.vm.network.firewall.protect_vms", True, "bool", "VMs do not reach each other"),
    ("internal.vm.network.firewall.allow_login_from_vm", False, "bool", "VMs may reach the L7R port (and ping) "
     "of the node addresses"),
    ("vm.network.netns.prefix", "qvd", "str", "ours: name prefix of netns VMs' namespaces, and of every "
     "bridge VM's port <prefix>v<vm id> (netns veth, kvm tap, lxc veth)"),
    ("vm.network.netns.udhcpc", "busybox udhcpc", "str", "ours: DHCP client run inside a netns VM"),
    ("vm.network.netns.dhcp_timeout", 20, "int", "ours: seconds a netns VM may take to get its DHCP lease"),
    ("vm.uid.base", 1900000000, "int", "ours: a node running as root runs process and netns VM n as uid and "
     "gid vm.uid.base + n; the range must hold no user, group or subordinate (/etc/subuid) id"),
    ("vm.uid.count", 100000000, "int", "ours: size of that uid range; VM ids must be below it"),
    ("vm.hidden_paths", "", "list", "ours: more files and folders (absolute) that process and netns VMs do not "
     "see; node.conf, path.run, path.log and path.l7r.ssl* are always hidden"),
    ("vm.environment.pass", "", "list", "ours: names of the node's environment variables that process and "
     "netns VMs also get (their environment is otherwise built from scratch)"),
    ("vm.process.address.base", "auto", "str", "ours: loopback range of this node's process VMs (VM n gets "
     "its n-th address); auto: a /16 of 127.0.0.0/8 that no other node on this machine holds, kept in "
     "${path.run}/process-vms/address-range"),
    ("internal.vm.network.dhcp-hostsfile", "${path.run}/dhcp-hostsfile", "path", "dnsmasq static leases"),
    ("command.dhcpd", "dnsmasq", "str", "dnsmasq executable"),
    ("command.dhcpd.args.extra", "", "str", "extra dnsmasq arguments"),
    ("command.iptables", "iptables", "str", "iptables executable"),
    ("command.nft", "nft", "str", "ours: nftables executable of the VM network filter (the original used "
     "command.iptables and command.ebtables)"),
    ("internal.vm.port.vma", 3030, "int", "VMA port inside a VM"),
    ("vm.vma.legacy_unauthenticated", False, "bool", "ours: call VMAs without their secret and open their display without a key, "
     "as the original did (for images that carry the original VMA); logged as a warning at every start"),
    ("internal.vm.port.ssh", 22, "int", "ssh port inside a VM"),
    ("internal.nxagent.display", 100, "int", "nxagent display; the X port is display + 4000"),
    # --- admin defaults ---
    ("osf.default.memory", 256, "int", "MB of RAM of a new OSF"),
    ("osf.default.overlay", True, "bool", "new OSFs use overlays"),
    ("osf.default.is_application", False, "bool", "new OSFs are applications"),
    ("model.user.login.case-sensitive", False, "bool", "keep login case"),
    ("wat.multitenant", True, "bool", "several tenants (WAT setting, kept for compatibility)"),
    # --- VMA (inside the VM) ---
    ("vma.user.default.name", "qvd", "str", "desktop user when the L7R sends none"),
    ("vma.user.default.groups", "qvduser", "str", "groups of the desktop user"),
    ("vma.default.client.keyboard", "pc105/en", "str", "nxagent keyboard when the client sends none"),
    ("vma.default.client.link", "adsl", "str", "nxagent link when the client sends none"),
    ("vma.audio.enable", False, "bool", "enable NX audio"),
    ("vma.slave.enable", False, "bool", "enable the NX slave channel"),
    ("vma.printing.enable", False, "bool", "enable NX printing"),
    ("internal.nxagent.timeout.listening", 10, "int", "seconds an X session may stay listening"),
    ("internal.nxagent.timeout.starting", 20, "int", "seconds an X session may take to start (the original's unused 'initiating' timeout)"),
    ("internal.nxagent.timeout.suspending", 20, "int", "seconds an X session may take to suspend"),
    ("internal.nxagent.timeout.stopping", 20, "int", "seconds an X session may take to stop"),
    ("internal.vma.nxagent.tolerancechecks", "risky", "str", "nxagent tolerancechecks option"),
    ("command.nxagent", "nxagent", "str", "ours: nxagent executable of the nx desktop"),
    ("vma.nxagent.display.first", 200, "int", "ours: first local X display tried for nxagent behind the VMA's display gate"),
    ("internal.vma.http.timeout", 20, "int", "ours: seconds the VMA waits on a silent RPC connection before closing it"),
    ("internal.vma.display.key_timeout", 5, "int", "ours: seconds the VMA's display port waits for a new connection's one-time key"),
    ("vma.nxagent.direct", False, "bool", "ours: nxagent listens on 4000+internal.nxagent.display itself (the original's layout, unauthenticated VMAs only) instead of behind the VMA's display gate"),
    ("command.x-session", "", "str", "X session the nx and x desktops start on their display (original: /usr/bin/startlubuntu); empty: none (the x desktop then runs vma.x.session)"),
    ("command.xvnc", "Xvnc", "str", "ours: TigerVNC's Xvnc, the X and VNC server of the x desktop (the browser client's)"),
    ("vma.x.background", "#3465A4", "str", "ours: root window colour of the x desktop (xsetroot -solid); empty: X's default"),
    ("vma.x.session", "xclock -update 1 -geometry 220x220-40+40", "str", "ours: program the x desktop starts on its display when command.x-session is empty"),
    ("vma.x.geometry", "1024x768", "str", "ours: screen size of the x desktop when the client asks for none (qvd.client.geometry)"),
    ("vma.x.display.first", 300, "int", "ours: first local X display tried for the x desktop's Xvnc"),
    ("vma.poweroff.command", "poweroff", "str", "ours: command the VMA runs on poweroff (unless it runs as qvd-vm-init)"),
    ("client.timeout.connect", 30, "int", "ours: qvd-client seconds to open the TCP+TLS connection to the L7R"),
    ("client.timeout.linger", 2, "float", "ours: qvd-client seconds to wait for the server's last bytes after the local side closed"),
]

DEFAULTS = {name: Key(name, default, typ, meaning) for name, default, typ, meaning in _TABLE}

# The HKD derives timeouts by state path; the original spelled these per hypervisor.
# Both spellings are accepted: internal.hkd.<hv>.timeout.on_state.X overrides the generic one.
