"""The project's one user-facing exception.

The CLI turns a `RegionSpotError` into a single line on stderr and exit code 1
(`REGIONSPOT_DEBUG=1` shows the traceback). Raise it for anything the user can fix:
the message names the bad value, the valid choices and the fix.
"""


class RegionSpotError(Exception):
    """An error the user can fix; its message is the whole story, on one line."""
