"""Test harness: tiny locally built models and real engine servers as subprocesses.

Nothing here is imported by the library itself; it serves the e2e tests and ``kvconnect demo``.
"""
