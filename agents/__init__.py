"""Double DQN agent: networks, encodings, optimizers, interventions, learner, actor."""

import warnings

# google-api-core (from the `cluster` extra; TensorFlow imports it wherever it is installed) warns at import that
# Python 3.10, the one Launchpad runs on, is unsupported: on every command, and no user of this stack can act on it.
warnings.filterwarnings('ignore', message='You are using a non-supported Python version', category=FutureWarning)
