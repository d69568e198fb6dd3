"""``python -m nextoffline ...`` runs the command line interface (same as the ``nextoffline`` script)."""

from nextoffline.cli import main

if __name__ == "__main__":
    main(prog_name="nextoffline")
