"""Curtailment orders from the grid operator: verified, acknowledged, obeyed, reported.

Layers, as the rest of rigd: `orders` (the wire contract, pydantic models), `verify`
(JWS and claims: is this message genuine and fresh?), `book` (the order lifecycle,
compliance and the heartbeat failsafe: pure, time in, limits and reports out),
`service` (the glue between MQTT, the state database and the control loop) and `sign`
(the operator-side tools behind `rigctl grid`).
"""
