r"""PNG plots of a run's probe records.

  python -m probes.report --run_dir=runs/mnist_easy

writes, under RUN_DIR/plots/:
  probe_curves.png  the probe's learning curves, one per probe point, coloured
                    by learner step (the paper's figure 4);
  plasticity.png    final probe loss, target variance (baseline) and
                    plasticity = baseline - final loss over learner steps.
"""

import os
from typing import Dict, List, Sequence

from absl import app
from absl import flags
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from launch.loggers import read_jsonl

PROBES_FILE = 'probes.jsonl'
PLOTS_DIR = 'plots'

Record = Dict[str, object]


def plot_probe_curves(records: Sequence[Record], title: str) -> plt.Figure:
  fig, ax = plt.subplots(figsize=(6, 4))
  steps = [r['learner_step'] for r in records]
  cmap = plt.get_cmap('viridis')
  span = max(max(steps) - min(steps), 1)
  for record in records:
    x, y = zip(*record['curve'])
    ax.plot(x, y, color=cmap((record['learner_step'] - min(steps)) / span), lw=1.5,
            label=f'step {record["learner_step"]}')
  ax.set_yscale('log')
  ax.set_xlabel('probe optimizer step')
  ax.set_ylabel(f'mean loss over {records[0]["num_targets"]} targets')
  ax.set_title(title)
  if len(records) <= 12:
    ax.legend(title='learner step', fontsize=7, title_fontsize=8)
  else:
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(min(steps), max(steps)))
    fig.colorbar(mappable, ax=ax, label='learner step')
  fig.tight_layout()
  return fig


def plot_plasticity(records: Sequence[Record], title: str) -> plt.Figure:
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
  steps = [r['learner_step'] for r in records]
  top.errorbar(steps, [r['final_loss_mean'] for r in records], yerr=[r['final_loss_std'] for r in records],
               marker='o', capsize=3, label='final probe loss')
  top.plot(steps, [r['baseline'] for r in records], 'k--', label='baseline (target variance)')
  top.set_ylabel('loss')
  top.legend(fontsize=8)
  top.set_title(title)
  bottom.plot(steps, [r['plasticity'] for r in records], marker='o', color='tab:green')
  bottom.set_ylabel('plasticity\n(baseline - final loss)')
  bottom.set_xlabel('learner step')
  fig.tight_layout()
  return fig


def write_report(run_dir: str) -> List[str]:
  """Writes the plots of one run directory; returns their paths."""
  path = os.path.join(run_dir, PROBES_FILE)
  if not os.path.exists(path):
    raise ValueError(f'{run_dir} holds no {PROBES_FILE}: is it a run directory with an evaluator (--probe_every > 0)?')
  records = sorted(read_jsonl(path), key=lambda r: r['learner_step'])
  if not records:
    raise ValueError(f'{path} holds no probe record yet.')
  os.makedirs(os.path.join(run_dir, PLOTS_DIR), exist_ok=True)
  title = os.path.basename(os.path.normpath(run_dir))
  written = []
  for name, plot in (('probe_curves.png', plot_probe_curves), ('plasticity.png', plot_plasticity)):
    fig = plot(records, title)
    out = os.path.join(run_dir, PLOTS_DIR, name)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    written.append(out)
  return written


def main(argv):
  del argv
  if not flags.FLAGS.run_dir:
    raise app.UsageError('--run_dir is required.')
  try:
    for path in write_report(flags.FLAGS.run_dir):
      print(path)
  except ValueError as e:
    raise app.UsageError(str(e))


if __name__ == '__main__':
  # Defined here, not at import: launch.train imports this module and has its own --run_dir.
  flags.DEFINE_string('run_dir', None, 'Run directory holding probes.jsonl.')
  app.run(main)
