"""Double DQN agent: networks, encodings, optimizers, interventions, learner, actor."""
