"""Upstream side: HTTP/1.1 and HTTP/2 connections to upstream servers, their
bounded pools, the balancer that picks a server, and health (active probes, idle timeouts)."""
