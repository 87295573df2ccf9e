"""Cluster mode: nodes that share a database and talk to each other through Redis.

`bus` owns the Redis connections (commands, an ordered publisher, the subscription),
`registry` the node heartbeats, `presence` the online map, `hub` the fan-out of
events to users on other nodes, `rooms` the placement of rooms, and `link` wires
them into a node and runs their lifespan. `codec` is what travels on the bus.
"""
