"""Operating-system helpers below the HKD and the hypervisors (rank 0: imports nothing of qvd_gevent).

procfs: what the node reads in /proc; spawn: children started with posix_spawn and reaped by
the hub; netlink: the node's rtnetlink socket.
"""
