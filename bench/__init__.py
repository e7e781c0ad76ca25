"""mailgate's benchmark suite: run with `.venv/bin/python -m bench` (see bench/README.md)."""
