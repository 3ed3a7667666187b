"""Grid orders as values: the wire contract (`orders`) and their lifecycle (`book`).

Verification of the signed messages lives in `controller.adapters.grid`, the glue with
MQTT, the state database and the control loop in `controller.runtime.grid_service`.
"""
