"""The subcommands behind cli.py: run, check-config, probe, top and demo."""
