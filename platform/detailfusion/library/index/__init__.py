"""The gallery index: exact search (``exact``), compressed IVF-PQ / token-pooled search (``compressed``), shards
(``sharded``) and the files they live in (``store``)."""
