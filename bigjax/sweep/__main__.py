"""The bigjax-sweep command (`python -m bigjax.sweep`); see bigjax.sweep for sweep files."""

from __future__ import annotations

from collections.abc import Sequence
import os
import signal
import sys

from bigjax import cli
from bigjax.cluster import resources
import bigjax.sweep
from bigjax.sweep.launch import run_sweep


def main(argv: Sequence[str] | None = None) -> None:
  """CLI entry (argv[0] = program; default sys.argv). Exits 2 on invalid input (one line), 1 when
  some runs failed (named), 130 when interrupted, 143 on SIGTERM, else 0."""
  cli.run(_main, argv)


def _main(argv: Sequence[str]) -> int:
  p = cli.Parser('bigjax-sweep', bigjax.sweep.__doc__)
  p.string('sweep', None, 'the sweep file, e.g. experiments/<name>/sweep.py', required=True)
  p.string('workdir', None, 'where runs/, results.* and the plots go', required=True)
  p.integer('jobs', None, 'runs at a time (default: 1 locally; any number on a cluster)')
  p.string('launcher', 'local', 'where the runs go: local (subprocesses), slurm or ray')
  p.string('ray_address', '', 'the Ray cluster for --launcher=ray (default $RAY_ADDRESS or local)')
  resources.add_flags(p, "Sweep.resources in the sweep file")
  fv = p.parse(argv)
  # SIGTERM unwinds like Ctrl-C: the runs get SIGTERM too (they save a checkpoint and exit).
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  try:
    runs = run_sweep(
      fv.sweep, fv.workdir, fv.jobs, fv.launcher, resources.given_flags(fv), fv.ray_address
    )
  except KeyboardInterrupt:
    print('bigjax: sweep interrupted; run the same command again to resume', file=sys.stderr)
    return 130
  finally:
    signal.signal(signal.SIGTERM, previous)
  with open(os.path.join(fv.workdir, 'results.md')) as f:
    print(f.read())
  failed = [r.name for r in runs if r.status == 'failed']
  if failed:
    print(
      f'bigjax: sweep: {len(failed)} of {len(runs)} runs failed: {", ".join(failed)} (their '
      f'log.txt is under {os.path.join(fv.workdir, "runs")})',
      file=sys.stderr,
    )
    return 1
  return 0


if __name__ == '__main__':
  main()
