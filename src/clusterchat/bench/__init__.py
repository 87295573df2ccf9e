"""The load generator (`clusterchat bench`)."""
