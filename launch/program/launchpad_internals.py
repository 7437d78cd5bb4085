"""Every touch of Launchpad's and xmanager's private internals, in one place, each with why it is needed.

Launchpad 0.5.2 (the last release, pinned in pyproject.toml) has no public
API for what a supervised, relaunched, dry-runnable program needs; the code
elsewhere goes through the names here. Importing this module with another
Launchpad version fails: each touch must be checked against the new version's
source first, and `PINNED` raised.
"""

import contextlib
import importlib.metadata
from typing import Any, Callable, Dict, Iterator, List

from launchpad.launch import worker_manager

PINNED = '0.5.2'
_INSTALLED = importlib.metadata.version('dm-launchpad')
if _INSTALLED != PINNED:
  raise ImportError(f'dm-launchpad {_INSTALLED} is installed; launch/program/launchpad_internals.py is written for '
                    f'{PINNED} (pyproject.toml pins it): check each of its touches against the new version first.')


def allow_another_main_manager() -> None:
  """Launchpad lets one worker manager per process be the 'main' one, which kills processes left at its end; a
  relaunch in the same launcher makes a new manager, and it must be main too, or a late node of it outlives it."""
  worker_manager._HAS_MAIN_MANAGER = False  # pylint: disable=protected-access


def set_local_log_dir(path: str) -> None:
  """Where local_mp's `output_to_files` terminal writes the nodes' logs: Launchpad reads a module constant (set
  from a flag at import), and each launch of a run has its own directory."""
  from launchpad.launch.run_locally import launch_local_output_to_files  # pylint: disable=g-import-not-at-top
  launch_local_output_to_files._LOGGING_DIR = path  # pylint: disable=protected-access


@contextlib.contextmanager
def worker_manager_factory(factory: Callable[..., worker_manager.WorkerManager]) -> Iterator[None]:
  """Within it, Launchpad's local launchers make their worker manager with `factory` (they call
  `worker_manager.WorkerManager(**kwargs)`; there is no parameter to pass one in)."""
  original = worker_manager.WorkerManager
  worker_manager.WorkerManager = factory
  try:
    yield
  finally:
    worker_manager.WorkerManager = original


def stop_workers(manager: worker_manager.WorkerManager) -> None:
  """Stops a launch's nodes as Launchpad does when a node calls `lp.stop()`: its SIGTERM handler, the one entry
  point that starts the termination notice's countdown (the launcher's main thread only)."""
  manager._sigterm()  # pylint: disable=protected-access


def disable_signals(manager: worker_manager.WorkerManager) -> None:
  """Removes a manager's signal handlers and its termination countdown, so that a later launch's manager alone
  counts down a later stop."""
  manager._disable_signals()  # pylint: disable=protected-access


class WorkerManager(worker_manager.WorkerManager):
  """Launchpad's worker manager with the private state a subclass that restarts processes needs, named.

  `before_check` runs where Launchpad checks its processes for failures (its
  `_check_workers`, with its lock held), so a subclass sees a failed process
  before Launchpad stops the program for it.
  """

  def before_check(self) -> None:
    """Called with the lock held before each check for failed processes."""

  def _check_workers(self):  # pylint: disable=invalid-name  Launchpad's hook.
    self.before_check()
    super()._check_workers()

  @property
  def workers(self) -> Dict[str, List[Any]]:
    """Each node's processes (or threads) that Launchpad waits for and checks: edit to add or drop one."""
    return self._active_workers  # pylint: disable=protected-access

  @property
  def lock(self):
    """The lock Launchpad holds while it checks or changes its processes."""
    return self._mutex  # pylint: disable=protected-access

  def stopping(self) -> bool:
    """Whether a stop is under way (a node's `lp.stop()`, a signal, or the termination countdown)."""
    return bool(self._stop_counter) or self._stop_event.is_set()  # pylint: disable=protected-access

  def fail(self, error: BaseException) -> None:
    """Makes `error` the program's failure, as a node's non-zero exit would (the first one counts)."""
    if not self._first_failure:  # pylint: disable=protected-access
      self._first_failure = error  # pylint: disable=protected-access


@contextlib.contextmanager
def offline_xmanager(build_by_dockerfile: Callable[..., str], custom_job: Callable[..., Any], project: str,
                     database_path: str) -> Iterator[None]:
  """xmanager's Vertex AI launch with its image build, its job submission, its credentials and its database
  replaced (the dry run of `--launch_type=vertex_ai`): xmanager 0.3.0 takes none of them as parameters."""
  from unittest import mock  # pylint: disable=g-import-not-at-top
  from google.cloud import aiplatform  # pylint: disable=g-import-not-at-top
  from xmanager.cloud import auth, build_image, vertex  # pylint: disable=g-import-not-at-top
  from xmanager.xm_local.storage import database  # pylint: disable=g-import-not-at-top
  scratch_db = database.Database(database.SqliteConnector, database.sqlite_settings(database_path))
  with contextlib.ExitStack() as stack:
    for target, name, value in [
        (auth, 'get_project_name', lambda: project), (auth, 'get_bucket', lambda: project),
        (auth, 'get_service_account', lambda: project),
        (build_image, 'build_by_dockerfile', build_by_dockerfile), (build_image, 'push', lambda image: image),
        (aiplatform, 'CustomJob', custom_job), (database, 'database', lambda: scratch_db),
        (vertex, '_default_client', None)]:
      stack.enter_context(mock.patch.object(target, name, value))
    yield


def submitted_job(resource_name: str, dashboard: str) -> Any:
  """What xmanager reads of a submitted `aiplatform.CustomJob`: its resource name and its private dashboard URI."""
  from unittest import mock  # pylint: disable=g-import-not-at-top
  return mock.Mock(resource_name=resource_name, _dashboard_uri=lambda: dashboard)
