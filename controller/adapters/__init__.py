"""The outside world: MQTT, the admin socket, systemd, metrics, history, Home Assistant,
the state database, discovery and the signed grid-order format.

Each adapter is handed a narrow read-only view (a Protocol in `controller.adapters.ports`)
and the few commands it may call; none imports the runtime, so an adapter can be read,
tested and replaced without the daemon in mind.
"""
