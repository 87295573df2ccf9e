"""The protocol core: bytes to typed requests and replies/events to bytes, with no I/O."""
