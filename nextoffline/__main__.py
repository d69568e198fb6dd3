"""``python -m nextoffline ...`` runs the command line interface (same as the ``nextoffline`` script)."""

from nextoffline.cli import run

if __name__ == "__main__":
    run()
