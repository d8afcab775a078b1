"""Fidelity report of MSA training (issue 10): the run matrix, result collection, report."""
