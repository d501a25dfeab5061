"""``python -m neuroloc``: the ``neuroloc`` command, for environments where the console script is not on PATH."""

from neuroloc.cli import main

main(prog_name="neuroloc")
