"""When a run is over: the one definition, read from the records its nodes write, and the coordinator that stops
the program once it holds.

`work_left` is what "finished" means: training to --max_learner_steps (or
divergence), the evaluation of the last step (with --eval_every_frames), and
every scheduled probe point probed or listed as skipped. The launcher's exit
code (`program_completed`, whatever ended the launch) and the program's own
stop (`Coordinator`, run in the learner's node once training is over, as
Acme's StepsLimiter ends a program from the nodes' counts) both read it; no
other node decides that the run is over.
"""

import time
from typing import Callable, List, Optional

from probes.records.loggers import Record
from probes.records.run_dir import ExperimentConfig, RunLayout


def last_record(records: List[Record]) -> Optional[Record]:
  return records[-1] if records else None


def scheduled_probe_points(probe_every: int, last_step: int) -> List[int]:
  """The learner steps a run probes: 0, probe_every, 2 * probe_every, ... and its last step."""
  return sorted(set(range(0, last_step + 1, probe_every)) | {last_step}) if probe_every > 0 else []


def training_end(config: ExperimentConfig) -> Optional[int]:
  """The learner's last step if training is over (it reached --max_learner_steps or diverged), else None."""
  return _end(config, last_record(config.layout.records(RunLayout.LEARNER)))


def _end(config: ExperimentConfig, learner: Optional[Record]) -> Optional[int]:
  """`training_end` from the learner's last record."""
  if not learner or not (learner.get('diverged') or learner['learner_step'] >= config.max_learner_steps):
    return None
  return learner['learner_step']


def unprobed_points(config: ExperimentConfig, last_step: int) -> List[int]:
  """The scheduled probe points up to `last_step` that no probe record measured and none lists as skipped."""
  accounted = set()
  for record in config.layout.records(RunLayout.PROBES):
    accounted.add(record['learner_step'])
    accounted.update(record.get('skipped_probe_steps') or ())
  return [step for step in scheduled_probe_points(config.probe_every, last_step) if step not in accounted]


def work_left(config: ExperimentConfig, evaluator: bool = True) -> bool:
  """Whether the run has work left, from the records its nodes wrote: training until --max_learner_steps (or
  divergence), the evaluation of the last step (with --eval_every_frames), and, with `evaluator`, every
  scheduled probe point probed or listed as skipped."""
  learner = last_record(config.layout.records(RunLayout.LEARNER))  # Read once: the coordinator polls this.
  end = _end(config, learner)
  if end is None:
    return True
  if config.evaluation.enabled and not learner.get('diverged'):  # Else its last finite step is the one evaluated.
    evaluation = last_record(config.layout.records(RunLayout.EVALUATION))
    if not evaluation or evaluation['learner_step'] < end:
      return True
  return evaluator and bool(unprobed_points(config, end))


def program_completed(config: ExperimentConfig) -> bool:
  """Whether the run is finished (exit 0), read from the records once a launch has ended, whatever ended it (the
  coordinator's stop, a node's failure, a signal): a stop, a failure or a disabled evaluator can end a launch
  with work left."""
  return not work_left(config)


def evaluator_disabled(layout: RunLayout, attempt: int) -> bool:
  """Whether launch `attempt` disabled its evaluator (failed past its restarts in place: the restarts stream)."""
  return any(r.get('disabled') and r.get('attempt') == attempt and str(r.get('node', '')).startswith('evaluator')
             for r in layout.records(RunLayout.RESTARTS))


class Coordinator:
  """Decides when launch `attempt` of a run is over: no work left, the probes excepted once its evaluator is
  disabled (training goes on without it; a relaunch probes the points it left)."""

  def __init__(self, config: ExperimentConfig, attempt: int, poll_s: float = 1.0):
    self._config = config
    self._attempt = attempt
    self._poll_s = poll_s

  def over(self) -> bool:
    return not work_left(self._config, evaluator=not evaluator_disabled(self._config.layout, self._attempt))

  def wait_until_over(self, should_stop: Callable[[], bool]) -> bool:
    """Polls the records until the launch is over (True) or a stop is requested (False)."""
    while not should_stop():
      if self.over():
        return True
      time.sleep(self._poll_s)
    return False
