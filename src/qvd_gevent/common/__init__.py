"""What every layer uses: process-wide metrics and the logging set-up (rank 0: imports nothing of qvd_gevent)."""
