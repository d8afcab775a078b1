"""Research code, not on any production path: the library layers do not import it
(tests/test_import_graph.py).

* :mod:`.fidelity`: the fidelity matrix of MSA training (issue 10): runs, collection, report
  (CLI: scripts/fidelity.py; docs/fidelity.md).
* :mod:`.cp_exchange`: the op-level CP function, the selected-blocks K/V exchange and the CP
  communication model (tests/experiments/test_cp_exchange.py; docs/context_parallel.md).
"""
