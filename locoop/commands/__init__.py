"""One module per `python -m locoop <command>`; each exposes `add_arguments(parser)` and `run(args)`."""
