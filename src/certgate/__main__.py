"""``python -m certgate``."""

from certgate.cli import main

main()
