"""The Vertex AI API as the replicas of `launch.cluster_sim`'s emulated job reach it: the job's cancel.

On Vertex AI, `lp.stop()` (launchpad/program_stopper) calls
`aiplatform.init(project=$CLOUD_ML_PROJECT_ID)` and
`aiplatform.CustomJob.get($CLOUD_ML_JOB_ID).cancel()`; Vertex AI then stops
every replica. The emulated job puts this directory on the replicas'
PYTHONPATH, so that `google.cloud.aiplatform` is this small stand-in: the
cancel writes the file `$PLASTICITY_VERTEX_CANCEL`, which the harness (the
job's control plane) watches. Nothing else of the replicas changes, and no
replica dials anything outside the simulated cluster.
"""

import importlib.abc
import importlib.machinery
import json
import os
import sys
import time
import types

CANCEL_ENV = 'PLASTICITY_VERTEX_CANCEL'
MODULE = 'google.cloud.aiplatform'


class _CustomJob:
  """A job handle whose `cancel` asks the harness to cancel the job."""

  def __init__(self, name: str):
    self.resource_name = name

  @classmethod
  def get(cls, name: str, **kwargs) -> '_CustomJob':
    del kwargs
    return cls(name)

  def cancel(self) -> None:
    path = os.environ[CANCEL_ENV]
    partial = f'{path}.{os.getpid()}.tmp'
    with open(partial, 'w') as f:
      json.dump({'job': self.resource_name, 'time': time.time(), 'pid': os.getpid(),
                 'task': json.loads(os.environ.get('CLUSTER_SPEC', '{}')).get('task')}, f)
    os.replace(partial, path)


class _Loader(importlib.abc.Loader):

  def create_module(self, spec):
    return None

  def exec_module(self, module: types.ModuleType) -> None:
    module.init = lambda **kwargs: None
    module.CustomJob = _CustomJob


class _Finder(importlib.abc.MetaPathFinder):

  def find_spec(self, fullname, path, target=None):
    if fullname != MODULE:
      return None
    return importlib.machinery.ModuleSpec(fullname, _Loader())


if os.environ.get(CANCEL_ENV):
  sys.meta_path.insert(0, _Finder())
