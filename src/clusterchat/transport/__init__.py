"""Transports: bytes in and out. Each is a thin adapter that feeds a Session."""
