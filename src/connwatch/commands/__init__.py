"""The subcommands behind cli.py: run (and the hidden _worker), check-config, probe, top and
demo; `event_loop.run_loop` is the loop runner they share. Each returns its exit code or raises:
only cli.py exits."""
