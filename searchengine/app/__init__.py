"""L6. The composition root: `wiring` builds models and services from settings; the CLI
(`cli`, `tuning_cli`) and the HTTP API (`api`) are its entry points; `entry` is the console script."""
