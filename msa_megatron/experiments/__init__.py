"""Research code, not on any production path: nothing in msa_megatron's library layers
imports it (tests/test_import_graph.py). Each module says which tests / docs / scripts use it."""
