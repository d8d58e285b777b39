"""The process around the proxy: command line, signals and drain, reload, worker
processes, systemd notification, and the demo upstream."""
