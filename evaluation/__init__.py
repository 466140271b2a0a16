"""Evaluation of a trained defense: the runner, its resumable state, the analysis and the report."""
