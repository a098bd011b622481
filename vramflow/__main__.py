"""`python -m vramflow` is the `vramflow` command."""

from vramflow.cli import main

main()
