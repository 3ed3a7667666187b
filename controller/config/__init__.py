"""The daemon's configuration: one TOML file, validated, overridable from the environment.

A broken config must never reach a running daemon: loading returns a fully checked
`Config` or raises `ConfigError` listing every problem with its path and line. Any setting
can be overridden by an environment variable RIGD_<SECTION>__<KEY> (double underscore
between levels), e.g. RIGD_MQTT__URL, so one file serves several environments.

The package, by job:

- `schema`: the sections of the file as validated models, `Config` at the root;
- `miners`: the `[[miners]]` rows, each with its driver's own settings (the drivers are
  the registry's kinds, `drivers.registry`);
- `fields`: the building blocks of both (strict tables, ids, ports, secrets);
- `environment`: the RIGD_... overrides; `locate`: TOML lines for error messages;
- `checks`: the checks that span sections; `load`: all of it, in order;
- `credentials`: secrets and files from systemd credentials instead of the file.

The names below are what the rest of rigd uses.
"""

from controller.config.environment import ENV_PREFIX, env_overrides
from controller.config.load import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    ConfigIssue,
    load_config,
    parse_config,
    summarize,
)
from controller.config.locate import locate_lines
from controller.config.miners import MAX_RANGE, MinerConfig, expand_range
from controller.config.schema import (
    AdminConfig,
    BudgetConfig,
    Config,
    ControlConfig,
    GridConfig,
    GridKeyConfig,
    GroupConfig,
    HeartbeatConfig,
    HistoryConfig,
    HomeAssistantConfig,
    MeterConfig,
    MetricsConfig,
    ModelTiming,
    MqttConfig,
    PduConfig,
    PollConfig,
    RigEntry,
    ScheduleConfig,
    SiteConfig,
    ZoneConfig,
    split_listen,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "MAX_RANGE",
    "AdminConfig",
    "BudgetConfig",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "ControlConfig",
    "GridConfig",
    "GridKeyConfig",
    "GroupConfig",
    "HeartbeatConfig",
    "HistoryConfig",
    "HomeAssistantConfig",
    "MeterConfig",
    "MetricsConfig",
    "MinerConfig",
    "ModelTiming",
    "MqttConfig",
    "PduConfig",
    "PollConfig",
    "RigEntry",
    "ScheduleConfig",
    "SiteConfig",
    "ZoneConfig",
    "env_overrides",
    "expand_range",
    "load_config",
    "locate_lines",
    "parse_config",
    "split_listen",
    "summarize",
]
