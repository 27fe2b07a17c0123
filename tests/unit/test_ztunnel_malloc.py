"""ztunnel re-executes itself with PYTHONMALLOC=malloc (memory returned after a load peak) unless the
operator chose an allocator."""

from __future__ import annotations

import os
import subprocess
import sys

from services.ztunnel.host import libc_malloc_argv

PROBE = ("import os, sys; from services.ztunnel.host import use_libc_malloc; use_libc_malloc(); "
         "print(os.getpid(), os.environ.get('PYTHONMALLOC'))")


def test_the_same_command_is_run_again_unless_an_allocator_was_chosen() -> None:
    argv = ["/usr/bin/python3", "-m", "services.ztunnel.app"]
    assert libc_malloc_argv({}, argv) == argv
    assert libc_malloc_argv({"PYTHONMALLOC": "pymalloc"}, argv) is None  # the operator's choice stands
    assert libc_malloc_argv({"PYTHONMALLOC": "malloc"}, argv) is None  # already re-executed
    assert libc_malloc_argv({}, []) is None


def test_the_process_runs_once_more_with_libc_malloc_and_keeps_its_pid() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}
    env["PYTHONPATH"] = os.getcwd()
    with subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE, text=True) as proc:
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    [line] = out.splitlines()  # the first run never printed: it became the second
    pid, allocator = line.split()
    assert allocator == "malloc"
    assert int(pid) == proc.pid  # executed again in place, not a child
    env["PYTHONMALLOC"] = "pymalloc"
    kept = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60,
                          check=True)
    assert kept.stdout.split()[1] == "pymalloc"
