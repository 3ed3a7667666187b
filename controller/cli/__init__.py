"""Entry points only: `rigd` (run, sim, demo, check-config), `rigctl`, `rigctl grid`, the live
view and the report. They parse arguments, compose the runtime with drivers or simulators,
and print; the decisions live in the core and the loop in the runtime."""
