"""``python -m isovisor.cli``: the ``isovisor`` command."""

from isovisor.cli.app import main

main()
