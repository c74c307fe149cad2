"""What follows pretraining with labels: the linear probe and fine-tuning, each a short trainer
of the same shape as pretraining's (a state, a pure step, evaluators, loop.Loop); their
labelled input is data/labelled.py."""
