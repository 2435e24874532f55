"""Proxy mode: the appliance owns the primary volume and sits in the host's data path
(docs/PROXY.md). The volume kind is :class:`cdp.proxy.volume.ProxyVolume`; its parts:
:mod:`~cdp.proxy.base` (shared state, DRL durability), :mod:`~cdp.proxy.copy` (initial
copy), :mod:`~cdp.proxy.reconcile` (crash reconcile, catch-up, rewind),
:mod:`~cdp.proxy.workers` (worker threads, range queue), :mod:`~cdp.proxy.primary`
(file and NBD primaries), :mod:`~cdp.proxy.drl` (the dirty region log file).
"""
