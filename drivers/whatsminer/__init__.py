"""MicroBT Whatsminer (btminer firmware): telemetry, sleep, wake and power limit over its API.

Two generations of the API are in the field and a farm has both, so the protocol has a
module per generation and the drivers sit on top:

- `v2`: API v2 (port 4028, firmware up to ~2024-11), the CGMiner protocol for reads plus
  btminer's own flat-reply commands, with token-authenticated, AES-encrypted writes;
- `v3`: API v3 (port 4433, newer firmware, where v2 control no longer works), length-
  prefixed JSON frames with SHA-256-token writes that follow the miner's clock;
- `crypto`: the md5-crypt, AES and token arithmetic both need (the simulator too);
- `parse`: what the generations' replies share (booleans as strings, quoted versions,
  the firmware date that tells the generations apart);
- `driver`: `WhatsminerDriver` (v2) and `WhatsminerV3Driver`, `identify()` for the scan
  and `make_whatsminer_driver()`.

Which API a miner speaks: `identify()` probes both ports; `driver_kind_for()` picks v3
for firmware dated after 2024-11 (the date pyasic uses to switch). Numbers may arrive as
strings; a reply the drivers cannot use is a `MalformedReply`, never a crash.

The names below are the package's public API; the modules hold the rest.
"""

from drivers.whatsminer.driver import (
    DEFAULT_MIN_FRACTION,
    WhatsminerDriver,
    WhatsminerV3Driver,
    identify,
    make_whatsminer_driver,
)
from drivers.whatsminer.parse import (
    FIRMWARE,
    MAKE,
    WhatsminerRejected,
    api_version_tuple,
    driver_kind_for,
    fw_date,
    model_name,
)
from drivers.whatsminer.v2 import (
    V2_PORT,
    BTMinerV2Client,
    check_v2_status,
    parse_error_codes,
    parse_v2_identity,
    parse_v2_telemetry,
)
from drivers.whatsminer.v3 import V3_PORT, BTMinerV3Client, parse_v3_identity, parse_v3_telemetry

__all__ = [
    "DEFAULT_MIN_FRACTION",
    "FIRMWARE",
    "MAKE",
    "V2_PORT",
    "V3_PORT",
    "BTMinerV2Client",
    "BTMinerV3Client",
    "WhatsminerDriver",
    "WhatsminerRejected",
    "WhatsminerV3Driver",
    "api_version_tuple",
    "check_v2_status",
    "driver_kind_for",
    "fw_date",
    "identify",
    "make_whatsminer_driver",
    "model_name",
    "parse_error_codes",
    "parse_v2_identity",
    "parse_v2_telemetry",
    "parse_v3_identity",
    "parse_v3_telemetry",
]
