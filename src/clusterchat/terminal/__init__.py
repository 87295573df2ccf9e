"""The interactive terminal client, `clusterchat client`.

`commands` parses typed lines and `view` turns replies and events into sentences, both without
I/O; `app` joins them to a terminal (prompt_toolkit) and to the server (`clusterchat.client.Client`).
"""
