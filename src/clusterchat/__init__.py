"""clusterchat: a horizontally scalable chat server (see PROTOCOL.md for the wire contract)."""

__version__ = "0.1.0"
