"""Research code, not on any production path: the library layers do not import it
(tests/test_import_graph.py; the one exception is msa-train's associative-recall data task,
training/assoc_recall_task.py).

* :mod:`.fidelity`: the fidelity matrix of MSA training (issue 10): runs, collection, report
  (CLI: scripts/fidelity.py; docs/fidelity.md).
* :mod:`.assoc_recall`: the multi-query associative recall (MQAR) task generator, a synthetic
  long-range retrieval benchmark ("associative recall"; not to be confused with *selection
  recall*, the share of the dense top-k blocks the indexer selects, megatron/metrics.py).
* :mod:`.cp_exchange`: the op-level CP function, the selected-blocks K/V exchange and the CP
  communication model (tests/experiments/test_cp_exchange.py; docs/context_parallel.md).
"""
