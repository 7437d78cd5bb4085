"""The evaluator: snapshots the learner's parameters and probes their plasticity.

Launchpad-free: it reads parameters and replay data through a callable and a
`ReplaySource`, so the same class serves the built-in evaluator node, an
evaluator attached to a live run, `probes.run` on a checkpoint, and unit tests.

Probe points are parameter snapshot files (agents/snapshots.py) in the
output's `probe_snapshots/`, removed once probed, so that they outlive an
evaluator's process: the run's learner writes them; an evaluator attached to
a live run takes its own over Courier.

Every probe point measures on the run's probe set (probes/measures/probe_set.py): the
same distinct inputs, target key and transitions throughout, so that probe
points differ only in the parameters, and `plasticity_loss` = P(theta_0) -
P(theta_t) compares like with like (positive when plasticity is lost).
"""

import io
import json
import threading
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from absl import logging
import jax
import numpy as np

from agents import checkpointing, snapshots, storage
from agents.builder import AgentParts
from agents.update import make_transition_loss
from agents.types import Params, StopRequested
from probes.measures import diagnostics
from probes.measures import plasticity
from probes.measures import probe_set as probe_sets
from probes.records.run_dir import EvaluatorState, ExperimentConfig, RunLayout, report_problem


WRITER = 'evaluator'  # Its record files' name in each stream it writes.
# (learner step, online parameters, target parameters): the learner's `get_snapshot`.
ParamsSource = Callable[[], Tuple[int, Params, Params]]


class _Unreadable(Exception):
  """A snapshot file that is damaged (moved aside): its point is skipped."""


class Snapshot(NamedTuple):
  """What one probe point measures: the learner's parameters at a step, and the probe set."""
  learner_step: int
  params: Params
  target_params: Params
  probe_set: probe_sets.ProbeSet


def _first_record(records: List[Dict[str, object]]) -> Optional[Dict[str, object]]:
  return min(records, key=lambda r: r['learner_step']) if records else None


class Evaluator:
  """Probes (and diagnoses) parameter snapshots, writing the files of `out` (a RunLayout; see WORKSPACE.md).

  Its records go to the loggers it is handed (by default `out`'s probes and
  diagnostics streams); the C_k matrices and its status file to `out`, where
  it also reads what it measured before a restart and the snapshots still to
  probe (`run`). The fixed probe set is
  read from (or drawn into) `probe_set_path`; with None it is kept in memory.
  `reference_probes` is another evaluator's directory (the run's, for an
  attached evaluator) whose first probe record serves as P(theta_0) when it probed
  the same set the same way; otherwise this evaluator's own first record does.
  `initial_source` gives the run's initial parameters: the first probe point
  of a run is then step 0 even if training began before the evaluator.
  """

  def __init__(self, agent: AgentParts, probe_config: plasticity.ProbeConfig, *, params_source: ParamsSource,
               replay_source: probe_sets.ReplaySource, out: RunLayout, probe_set_path: Optional[str] = None,
               diagnostics_config: Optional[diagnostics.DiagnosticsConfig] = None, seed: int = 0,
               discount: float = 0.99, reference_probes: Optional[RunLayout] = None,
               initial_source: Optional[ParamsSource] = None, attempt: Optional[int] = None):
    self._probe_config = probe_config
    self._params_source = params_source
    self._initial_source = initial_source
    self._replay_source = replay_source
    self._probe_set_path = probe_set_path
    self._probe_set: Optional[probe_sets.ProbeSet] = None
    self._replaced_probe_set: Optional[str] = None  # Where a damaged probe set was moved, if one was.
    self._reference_probes = reference_probes
    self._diagnostics_config = diagnostics_config
    self._out = out
    self._rng = jax.random.PRNGKey(seed)
    self._rng, self._target_key, perturbation_key = jax.random.split(self._rng, 3)
    network = agent.network
    self._init_params = network.init
    self._probe = plasticity.agent_probe(agent, probe_config)
    # Each record says which launch of the run wrote it (`attempt`), when the evaluator is a node of one.
    records_options = {'extra': {'attempt': attempt}} if attempt is not None else {}
    self._probe_logger = out.logger(RunLayout.PROBES, WRITER, **records_options)
    self._diagnose = None
    if diagnostics_config is not None:
      self._diagnose = diagnostics.make_diagnostics(
          network, diagnostics_config, perturbation_key,
          make_transition_loss(network, agent.encoding, discount))
      self._diagnostics_logger = out.logger(RunLayout.DIAGNOSTICS, WRITER, **records_options)
    # Resuming: the steps already probed and P(theta_0) come from the records written before.
    records = out.records(RunLayout.PROBES)
    self.last_probed_step: Optional[int] = max((int(r['learner_step']) for r in records), default=None)
    first = _first_record(records)
    self._reference: Optional[Tuple[int, float]] = None
    if first is not None and first.get('plasticity') is not None:
      self._reference = (int(first['learner_step']), float(first['plasticity']))
    self._status_lock = threading.Lock()
    self._status: Dict[str, object] = {}
    self._status_written = 0.0
    self._set_status(state=EvaluatorState.STARTING)

  @classmethod
  def for_run(cls, config: ExperimentConfig, agent: AgentParts, **wiring) -> 'Evaluator':
    """The evaluator of a run's configuration: its probe, its diagnostics (when enabled), its discount and its
    probe set; `wiring` gives the rest (where snapshots come from, the replay, the output layout, the seed)."""
    return cls(agent, config.probe, diagnostics_config=config.diagnostics if config.diagnostics_enabled else None,
               discount=config.agent.discount, **{'probe_set_path': config.layout.probe_set, **wiring})

  # Status: what the evaluator is doing, for the launcher's progress line.

  def _set_status(self, force: bool = True, **status) -> None:
    """Records what the evaluator does now; written at most once a second unless `force`."""
    with self._status_lock:
      self._status.update(status)
      now = time.time()
      if not force and now - self._status_written < 1.0:
        return
      self._status_written = now
      storage.write_atomically(self._out.evaluator_status, json.dumps({**self._status, 'time': now}).encode())

  # Snapshots and probe sets.

  def probe_set(self, learner_step: int, give_up: Callable[[], bool] = lambda: False,
                should_stop: Callable[[], bool] = lambda: False) -> Optional[probe_sets.ProbeSet]:
    """The run's probe set (loaded, or drawn now and saved), or a fresh one with `fresh_inputs`."""
    config = self._probe_config
    transitions = 0
    if self._diagnostics_config is not None:
      transitions = self._diagnostics_config.td_covariance_samples
    if config.fresh_inputs:
      self._rng, key = jax.random.split(self._rng)
      return probe_sets.draw(self._replay_source, config.num_inputs, transitions, key, learner_step, give_up,
                             should_stop)
    if self._probe_set is None and self._probe_set_path and storage.path(self._probe_set_path).exists():
      try:
        self._probe_set = probe_sets.load(self._probe_set_path)
        logging.info('Probe set of step %d read from %s (%d inputs).', self._probe_set.learner_step,
                     self._probe_set_path, self._probe_set.num_unique_inputs)
      except probe_sets.Damaged as e:  # Moved aside, and drawn again: the run goes on.
        try:
          self._replaced_probe_set = storage.move_aside(self._probe_set_path)
        except FileNotFoundError:
          pass  # Another evaluator moved it.
        report_problem(self._out, WRITER, self._probe_set_path, str(e),
                       f'Moved to {self._replaced_probe_set}; a new probe set is drawn (the probe records made on it '
                       f'name the file it replaced, probe_set_replaced).')
    if self._probe_set is None:
      self._set_status(state=EvaluatorState.DRAWING, learner_step=learner_step)
      drawn = probe_sets.draw(self._replay_source, config.num_inputs, transitions, self._target_key, learner_step,
                              give_up, should_stop)
      if drawn is None:
        return None
      drawn = drawn._replace(replaced=self._replaced_probe_set)
      self._probe_set = probe_sets.save(self._probe_set_path, drawn) if self._probe_set_path else drawn
    return self._probe_set

  def snapshot(self, give_up: Callable[[], bool] = lambda: False,
               should_stop: Callable[[], bool] = lambda: False) -> Optional[Snapshot]:
    """The learner's parameters now (one quick call: the learner never waits) and the probe set.

    None when no probe set could be had (the replay was still empty when `give_up()`, or a stop
    was requested before a set was drawn).
    """
    learner_step, params, target_params = self._params_source()
    drawn = self.probe_set(int(learner_step), give_up, should_stop)
    if drawn is None:
      logging.warning('No probe at learner step %d: stopped before a probe set was drawn, or the replay was '
                      'empty.', learner_step)
      return None
    return Snapshot(int(learner_step), params, target_params, drawn)

  # Measurements.

  def evaluate(self, snapshot: Optional[Snapshot] = None, should_stop: Callable[[], bool] = lambda: False,
               skipped_steps: Sequence[int] = ()) -> Dict[str, object]:
    """Probes (and diagnoses) a snapshot, by default of the learner now; returns the probe record (with
    `skipped_probe_steps`, the points skipped between the previous record's and this one, if any).

    A stop request ends it between probe chunks or diagnostics (`StopRequested`), and nothing of the
    point is written: its records are written together, at the end.
    """
    snapshot = snapshot or self.snapshot()
    learner_step, params, target_params, drawn = snapshot
    self._rng, diagnostics_key = jax.random.split(self._rng)
    steps = self._probe_config.steps
    self._set_status(state=EvaluatorState.PROBING, learner_step=learner_step, probe_step=0, probe_steps=steps)

    def progress(done: int) -> None:
      if should_stop():
        raise StopRequested(f'stopped at probe step {done} of learner step {learner_step}')
      self._set_status(force=False, probe_step=done)

    start = time.time()
    result = self._probe(params, drawn.inputs, jax.numpy.asarray(drawn.target_key), progress=progress)
    record = {'learner_step': int(learner_step), **result.as_record(),
              'num_unique_inputs': drawn.num_unique_inputs, 'probe_set_step': drawn.learner_step}
    if drawn.replaced:
      record['probe_set_replaced'] = drawn.replaced
    if drawn.num_unique_inputs < self._probe_config.num_inputs:
      logging.warning('Probe at learner step %d on %d distinct inputs (the replay held no more), not %d.',
                      learner_step, drawn.num_unique_inputs, self._probe_config.num_inputs)
    diagnosed = None
    if self._diagnose is not None:
      self._set_status(state=EvaluatorState.DIAGNOSING)
      diagnosed = self._diagnose(params, drawn.inputs, diagnostics_key, target_params, drawn.transitions,
                                 should_stop=should_stop)
    record.update(self._plasticity_loss(record))
    if skipped_steps:
      record['skipped_probe_steps'] = [int(step) for step in skipped_steps]
    logging.info('Probe at learner step %d: plasticity %.4f (loss of plasticity %.4f since step %d) in %.1fs',
                 learner_step, record['plasticity'], record['plasticity_loss'], record['plasticity_reference_step'],
                 time.time() - start)
    if diagnosed is not None:
      for kind, matrix in (('covariance', diagnosed.covariance), ('td_covariance', diagnosed.td_covariance)):
        if matrix is not None:
          buffer = io.BytesIO()
          np.save(buffer, matrix)
          storage.write_atomically(self._out.covariance(kind, learner_step), buffer.getvalue())
      self._diagnostics_logger({'learner_step': int(learner_step), **diagnosed.as_record()})
      logging.info('Diagnostics at learner step %d in %.1fs', learner_step, diagnosed.wall_times['total'])
    # Last: the probe record says the point is done (a restart goes on after it; killed before it, the point is
    # probed again and its diagnostics record repeated, which readers take once).
    self._probe_logger(record)
    self.last_probed_step = int(learner_step)
    self._set_status(state=EvaluatorState.IDLE, last_probed_step=self.last_probed_step)
    return record

  def _plasticity_loss(self, record: Dict[str, object]) -> Dict[str, object]:
    """P(theta_0) - P(theta_t) against the reference point (0 there); positive when plasticity is lost."""
    if self._reference is None:
      self._reference = self._borrowed_reference(record) or (record['learner_step'], record['plasticity'])
    step, plasticity_0 = self._reference
    return {'plasticity_loss': plasticity_0 - record['plasticity'], 'plasticity_reference_step': step}

  def _borrowed_reference(self, record: Dict[str, object]) -> Optional[Tuple[int, float]]:
    """The reference evaluator's first point, if it probed this same probe set with the same probe."""
    if not self._reference_probes or self._probe_config.fresh_inputs:
      return None
    first = _first_record(self._reference_probes.records(RunLayout.PROBES))
    if first is None or first.get('plasticity') is None:
      return None
    same = all(first.get(key) == record[key] for key in ('probe_steps', 'num_targets', 'probe_set_step',
                                                          'num_unique_inputs'))
    return (int(first['learner_step']), float(first['plasticity'])) if same else None

  # The schedule.

  def run(self, probe_every: int, learner_step: Callable[[], int], learner_finished: Callable[[], bool],
          should_stop: Callable[[], bool] = lambda: False, poll_seconds: float = 0.5, max_pending: int = 4,
          take_snapshots: bool = True) -> None:
    """Probes the snapshots of learner steps 0, probe_every, 2 * probe_every, ... and of the end, in order.

    Snapshots are files in `out`'s `probe_snapshots/` (agents/snapshots.py),
    each removed only once its point's records are written: a point outlives
    this process, and an evaluator (re)started on the same `out` first probes,
    in order, every snapshot there past its last probe record (one at or
    before it, a relaunched learner's repeat, is removed unprobed). With
    `take_snapshots` a thread takes them over `params_source`, on time (at
    the first look at or past each multiple of probe_every) while earlier
    ones are probed; without, the learner writes them (the run's own
    evaluator), and `learner_finished()` comes true only after its last.

    A snapshot that appears while `max_pending` wait is skipped (the probe is
    slower than training), with a warning: its step is in the
    `skipped_probe_steps` of the next point probed, and its file is removed
    only once that record is written (a restart before it probes the point:
    no point is lost unrecorded); the end of training is always probed. A
    damaged snapshot file is moved aside and its point skipped the same way
    (`_probe_file`). A damaged probe set is moved aside and drawn again.
    Every wait (for the replay, for the next step) ends on a stop request or
    when the learner has finished; a stop mid-probe drops the point's records
    but keeps its file, for the next start.
    """
    stop = threading.Event()
    errors = []
    thread = None
    if take_snapshots:
      def take_snapshots_on_time() -> None:
        try:  # `should_stop` is read in the caller's thread: Launchpad's stop event may answer only there.
          self._take_snapshots(probe_every, learner_step, learner_finished, stop, poll_seconds)
        except StopRequested:
          pass
        except BaseException as e:  # pylint: disable=broad-except  Re-raised in the caller's thread.
          errors.append(e)

      thread = threading.Thread(target=take_snapshots_on_time, name='evaluator-snapshots', daemon=True)
      thread.start()
    all_written = (lambda: not thread.is_alive()) if thread else learner_finished
    waiting: List[Tuple[int, str]] = []  # (step, file) of the points to probe, in order.
    skipped: List[Tuple[int, str]] = []  # (step, file) of points skipped, until the next point's record says so.
    admitted = self.last_probed_step  # The last step probed, waiting or skipped.
    start = True
    try:
      while not should_stop():
        last_written = all_written()  # Read before the files: once true, the last snapshot is among them.
        admitted = self._admit(waiting, skipped, admitted, max_pending, last_written, start)
        start = False
        if waiting:
          step, path = waiting.pop(0)
          self._set_status(snapshots_waiting=len(waiting))
          passed = [(k, file) for k, file in skipped if k < step]
          try:
            probed = self._probe_file(step, path, learner_finished, should_stop, [k for k, _ in passed])
          except _Unreadable:  # Moved aside: named in the next point's record.
            skipped, probed = sorted(skipped + [(step, path)]), False
          if probed:
            for _, file in passed:  # Recorded as skipped: a restart need not probe them.
              snapshots.remove(file)
            skipped = [point for point in skipped if point not in passed]
        elif last_written:
          break
        else:
          time.sleep(poll_seconds)
    except StopRequested as e:  # The point in progress is dropped whole; its file stays for the next start.
      logging.info('Evaluator stopping: %s.', e)
    finally:
      stop.set()
    if thread is not None:
      thread.join(timeout=max(20 * poll_seconds, 10.0))  # Its waits all see `stop`; a dead peer must not hold us.
      if thread.is_alive():
        logging.warning('The snapshot thread did not end within its grace period; leaving it behind.')
    self._set_status(state=EvaluatorState.FINISHED, snapshots_waiting=0)
    if errors:
      raise errors[0]

  def _admit(self, waiting: List[Tuple[int, str]], skipped: List[Tuple[int, str]], admitted: Optional[int],
             max_pending: int, last_written: bool, start: bool) -> Optional[int]:
    """Adds the snapshot files that appeared to `waiting` (all of them at the `start`), skipping those that find
    `max_pending` waiting, but never the last of training; removes those at or before the last probe record.
    Returns the last step admitted or skipped."""
    found = snapshots.saved(self._out.probe_snapshots)
    before = len(waiting)
    for step, path in found:
      if (step, path) in waiting or (step, path) in skipped:
        continue
      if admitted is not None and step <= admitted:  # Probed, or skipped; a relaunched learner wrote it again.
        logging.info('Snapshot of learner step %d is already probed or skipped: removed.', step)
        snapshots.remove(path)
        continue
      admitted = step
      if start or len(waiting) < max_pending:
        waiting.append((step, path))
      else:
        logging.warning('Evaluator behind: %d snapshots wait, so the probe at learner step %d is skipped '
                        '(fewer probe steps, a larger probe_every or an accelerator keep up).', max_pending, step)
        skipped.append((step, path))
    if last_written and found and found[-1] in skipped:  # The end of training, maybe seen before it was the end.
      logging.info('Learner step %d is the end of training: probed after all.', found[-1][0])
      skipped.remove(found[-1])
      waiting.append(found[-1])
    if len(waiting) != before:
      self._set_status(snapshots_waiting=len(waiting))
    return admitted

  def _probe_file(self, step: int, path: str, learner_finished: Callable[[], bool], should_stop: Callable[[], bool],
                  skipped: List[int]) -> bool:
    """Probes one snapshot file, then removes it; whether a record was written.

    A damaged (or planted) file is moved aside: the point is probed from the
    learner's published parameters if they are still of that step (at the
    end of training they are), else `_Unreadable` (the point is skipped).
    """
    drawn = self.probe_set(step, lambda: should_stop() or learner_finished(), should_stop)
    if drawn is None:
      if should_stop():
        raise StopRequested(f'stopped before the probe set of learner step {step} was drawn')
      logging.warning('No probe at learner step %d: the replay was empty when the learner finished.', step)
      snapshots.remove(path)
      return False
    try:  # Checked against the network's parameters: a file of other shapes is not fed to the probe.
      learner_step, params, target_params = snapshots.load(
          path, jax.eval_shape(self._init_params, jax.random.PRNGKey(0), drawn.inputs[:1]))
    except FileNotFoundError:
      logging.warning('The snapshot of learner step %d is gone (%s): not probed.', step, path)
      return False
    except checkpointing.CheckpointError as e:
      report_problem(self._out, WRITER, path, str(e),
                     f'Moved to {storage.move_aside(path)}; the point is probed from the learner\'s parameters if '
                     f'they are still of step {step}, else skipped (named in the next probe record\'s '
                     f'skipped_probe_steps).')
      learner_step, params, target_params = self._params_source()
      if int(learner_step) != step:
        raise _Unreadable(path) from e
    self.evaluate(Snapshot(learner_step, params, target_params, drawn), should_stop, skipped)
    snapshots.remove(path)  # Only now: the point's records are written.
    return True

  def _take_snapshots(self, probe_every: int, learner_step: Callable[[], int], learner_finished: Callable[[], bool],
                      stop: threading.Event, poll_seconds: float) -> None:
    """Writes the learner's parameters, fetched over `params_source`, as snapshot files on the schedule."""
    folder = self._out.probe_snapshots
    probed = [] if self.last_probed_step is None else [self.last_probed_step]
    last = max([step for step, _ in snapshots.saved(folder)] + probed, default=None)
    next_step = 0 if last is None else (last // probe_every + 1) * probe_every
    if last is None and self._initial_source is not None and learner_step() > 0:
      snapshots.save(folder, *self._initial_source())  # Training began first: theta_0 all the same.
      last, next_step = 0, probe_every
    while not stop.is_set():
      finished = learner_finished()
      step = learner_step()
      if step >= next_step or (finished and step != last):
        taken, params, target_params = self._params_source()
        snapshots.save(folder, taken, params, target_params)
        last = int(taken)
        next_step = (last // probe_every + 1) * probe_every
        if finished:
          return
        continue
      if finished:
        return
      stop.wait(poll_seconds)
