"""The training loop and what it alone uses: the run and its state, setup, the step, the
optimizer and schedule, stopping rules, the start-up summary."""
