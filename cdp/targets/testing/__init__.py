"""Testing tools for the targets, kept apart from the product (like ``trio.testing``).

- :mod:`.memdev`: ``MemoryDevice`` / ``MemoryProvider``, a RAM disk and its exports;
- :mod:`.nbd_wire`, :mod:`.iscsi_wire`: client-side message builders for NBD and an
  in-process iSCSI initiator driving a sans-I/O ``Connection`` without sockets;
- :mod:`.thread`, :mod:`.nbd_thread`, :mod:`.iscsi_thread`: a target server on its own
  event loop in a background thread (``with ServerThread(provider) as s: ... s.port``).

Tests, fuzzers, benchmarks and probes import them; the appliance (cdpd, cdpctl) never does.
"""
