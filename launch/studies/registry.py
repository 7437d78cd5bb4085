"""The paper's experiments as studies: a named grid of runs per scale, and the aggregation drawing its figure.

A study is a `Study` in the `STUDIES` registry: `cells(scale, options)` gives
its grid (each `Cell` a run's command and flags, and the axes the aggregation
groups by), `measure(cell, run_dir)` one finished run's numbers, and
`aggregate(layout, rows)` the tables and the figure. `launch/study.py` runs the
grid (`python -m launch.study`); nothing here launches anything.

Scales: `smoke` (a few hundred learner steps per cell), `cpu` (reduced but
faithful, for a few hours on 2 cores: the CNN at an eighth of its width, fewer
probe steps, fewer cells, no ResNet-18 or ViT), `paper` (the paper's settings).
"""

from environments.registry import Registry
from launch.studies import atari_layernorm, brownian, falsification, interventions, optimizer_instability
from launch.studies import optimizer_regime, width
from launch.studies.grid import Study

STUDIES: Registry[Study] = Registry('study', flag='--study')
for _study in (interventions, falsification, width, optimizer_instability, optimizer_regime, atari_layernorm,
               brownian):
  STUDIES.add(_study.STUDY.name, _study.STUDY)
