"""The L7R: QVD's TLS front door (docs/protocol.md).

Modules, one job each:
- ``tls``: key material from ``ssl_configs`` written 0600 in a 0700 folder, permission
  checks, the stdlib ``ssl`` context (TLS 1.2/1.3 only), reload on NOTIFY;
- ``http``: the h11 adapter (Host injection for the original client, limits, deadline,
  the original's response format, 102 and 101);
- ``auth`` and ``throttle``: Basic/Bearer/Auth-<hex>, tenants, password hashes, tokens,
  throttling of failed logins;
- ``server``: ``L7RService(cfg, db, listener)``: accept, TLS, the request loop, and the
  lifecycle of the parts below (``start()``, ``port``, ``drain(grace)``, ``stop()``);
- ``endpoints``: the endpoints as plain functions over a small ``Context``;
- ``connect``: connect_to_vm after its pre-checks: ``ConnectMachine`` (pure: the
  sequence, deadlines, retries, takeover and 102 lines) and the runner that executes its
  commands (claim, VM start and wait by LISTEN, VMA, display connection, 101, hand-over
  to the session); ``vma_params``: what the VMA's x_start gets, and the slave key;
- ``sessions``: the registry of live sessions, claims, waits, aborts and takeover,
  reconcile, and the end of a session;
- ``counters``: ``host_counters`` in batches and the L7R's gauges; ``host``: this node's row;
- ``splice``: the session's byte pump, no greenlet and no buffer per idle session.

Memory per idle session is measured in bench/ (bench/README.md, README's Performance).
"""
