"""Which MQTT 5 response topic rigd will publish an acknowledgement on, and which it refuses.

A sender names the response topic, and a forged or careless one must not make rigd publish
where it or others rely on what they read: rigd's own topics (its orders, its reports, the
site state any consumer trusts, the heartbeat it listens to) and the broker's `$` topics
(`$SYS/...`, where a publish is dropped without a word, so the sender would wait for an ack
that never comes). A refused topic is logged with the reason and the ack goes to
`rigd/<site>/grid/acks` instead.
"""

from __future__ import annotations

from collections.abc import Callable

from paho.mqtt.client import topic_matches_sub

MAX_RESPONSE_TOPIC = 256


def refusal(
    topic: str,
    *,
    site: str,
    heartbeat_topic: str | None = None,
    used_by_rigd: Callable[[str], bool] | None = None,
) -> str | None:
    """Why `topic` may not be a response topic, or None when it may.

    `used_by_rigd` tells whether the MQTT link subscribes to the topic or publishes it
    retained (Home Assistant discovery, zone reports outside `rigd/`)."""
    grid = f"rigd/{site}/grid/"
    if len(topic) > MAX_RESPONSE_TOPIC:
        return f"longer than {MAX_RESPONSE_TOPIC} characters"
    if "+" in topic or "#" in topic or "\x00" in topic:
        return "a topic filter, not a topic"
    if topic.startswith("$"):
        return "a broker's $ topic: a publish there is dropped"
    if topic.startswith("rigd/") and not topic.startswith(grid):
        return "one of rigd's own topics"
    for own in ("orders", "reports"):
        if topic == grid + own or topic.startswith(f"{grid}{own}/"):
            return f"rigd's own grid/{own} topic"
    if heartbeat_topic is not None and topic_matches_sub(heartbeat_topic, topic):
        return "the operator heartbeat topic rigd listens to"
    if used_by_rigd is not None and used_by_rigd(topic):
        return "a topic rigd subscribes to or publishes"
    return None
