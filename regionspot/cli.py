"""The `regionspot` command line: thin typer commands that check options and call one stage entry point.

Heavy imports happen inside each command, so `regionspot --help` is instant and a stage never
loads another stage's dependencies.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from regionspot.errors import RegionSpotError

app = typer.Typer(
    name="regionspot",
    help="Recognise any region: frozen SAM + frozen CLIP, a small trained fusion head, cached features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
shards_app = typer.Typer(help="Inspect and check shard sets written by 'regionspot extract'.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")


# --- extract ---
# --- end extract ---

# --- shards ---
# --- end shards ---

# --- train ---
# --- end train ---

# --- eval ---
# --- end eval ---

# --- predict ---
# --- end predict ---

# --- quickstart ---
# --- end quickstart ---


def main() -> None:
    """Console entry point: project errors become one line on stderr and exit code 1."""
    try:
        app(standalone_mode=False)
    except RegionSpotError as e:
        if os.environ.get("REGIONSPOT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # click usage errors carry their own formatting
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
