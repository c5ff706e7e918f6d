"""`mgm-bench` and every benchmark of the stack, importable from an installed wheel (client/bench/cli.py)."""
