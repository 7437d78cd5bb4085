r"""Draws the PNG plots of one run directory, or of several (probes/figures/plots.py says which).

  python -m probes.report --run_dir=runs/mnist_easy
  python -m probes.report --run_dir=runs/a,runs/b,runs/c --out_dir=plots/abc

Any directory an evaluator wrote works, RUN_DIR/evaluators/NAME included.
"""

from absl import app
from absl import flags

from probes.figures import plots
from probes.figures import study_plots
from probes.records.run_dir import RunLayout

RUN_DIR = flags.DEFINE_list('run_dir', None, 'Run directory (or directories, comma-separated) with probe records.')
OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where the cross-run plots go (default: FIRST_RUN/plots/comparison).')


def main(argv):
  del argv
  run_dirs = [d for d in (RUN_DIR.value or []) if d]
  if not run_dirs:
    raise app.UsageError('--run_dir is required: one run directory, or several separated by commas.')
  try:
    if len(run_dirs) == 1:
      paths = plots.write_report(run_dirs[0])
    else:
      out_dir = OUT_DIR.value or RunLayout(run_dirs[0]).comparison
      paths = study_plots.write_comparison(run_dirs, out_dir)
  except ValueError as e:
    raise app.UsageError(str(e))
  for path in paths:
    print(path)


if __name__ == '__main__':
  app.run(main)
