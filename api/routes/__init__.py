"""Thin HTTP routers: ``models`` (submit), ``requests`` (v2 status/result), ``health`` (operations)."""
