"""Rich consoles for the CLI that never wrap piped output.

On a terminal rich sizes output to the window. Anywhere else (a pipe, `| less`, a file, a CI log) rich would
assume 80 columns and break long lines: an iptables rule mid-rule, a log path, a copy-paste hint. Here every
line keeps its full length there instead, and tables take their natural width.

    console = make_console()              # stdout
    err_console = make_console(stderr=True)
    section(console, "3. the in-pod rules")   # a rule across the terminal; a plain heading elsewhere
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.rule import Rule

UNWRAPPED_WIDTH = 100_000
"""The width given to a console that is not a terminal: wider than any line it prints."""
HEADING_WIDTH = 80
"""How wide a section heading is drawn when there is no terminal to fill."""


def make_console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr) that wraps only on a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, highlight=False)
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=UNWRAPPED_WIDTH)


def section(console: Console, title: str) -> None:
    """A section heading: a rule with the title across a terminal, a fixed-width one anywhere else."""
    if console.is_terminal:
        console.print(Rule(f"[bold]{title}"))
        return
    bar = "─" * max(3, HEADING_WIDTH - len(title) - 4)
    console.print(f"── {title} {bar}", markup=False)
