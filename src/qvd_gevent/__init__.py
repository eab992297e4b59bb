"""qvd-gevent: a QVD server node (L7R + HKD) in one gevent process."""
__version__ = "0.1.0"
