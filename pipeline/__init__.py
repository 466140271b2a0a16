"""Run orchestration: the command line, the configuration, the stages in order, their checkpoints."""
