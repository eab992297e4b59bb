"""The L7R: QVD's TLS front door (docs/protocol.md).

Modules, one job each:
- ``tls``: key material from ``ssl_configs`` written 0600 in a 0700 folder, permission
  checks, the stdlib ``ssl`` context (TLS 1.2/1.3 only), reload on NOTIFY;
- ``http``: the h11 adapter (Host injection for the original client, limits, deadline,
  the original's response format, 102 and 101);
- ``auth`` and ``throttle``: Basic/Bearer/Auth-<hex>, tenants, password hashes, tokens,
  throttling of failed logins;
- ``broker``: connect_to_vm/stop_vm decisions (pure functions) and their runner (claim,
  takeover, node choice, start and wait by LISTEN, VMA, display connection);
- ``splice``: the session's byte pump, no greenlet and no buffer per idle session;
- ``server``: ``L7RService(cfg, db, listener)`` with ``start()``, ``port``,
  ``drain(grace)``, ``stop()``, ``sessions_open``, ``connections_open``.

Memory per idle session is measured in bench/ (bench/README.md, README's Performance).
"""
