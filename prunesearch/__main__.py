"""``python -m prunesearch`` is the ``prunesearch`` command."""

from prunesearch.cli import main

main()
