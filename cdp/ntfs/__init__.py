"""Read-only NTFS parsing for the file catalog (hand-written, ``struct`` based).

Modules, one per concept: :mod:`~cdp.ntfs.defs` (on-disk structures with Microsoft's
field names), :mod:`~cdp.ntfs.boot`, :mod:`~cdp.ntfs.record` (file records and fixups),
:mod:`~cdp.ntfs.attribute` (attribute values), :mod:`~cdp.ntfs.runlist`,
:mod:`~cdp.ntfs.mft` (the file system over a read callable) and
:mod:`~cdp.ntfs.partition` (finding NTFS on a disk). Damaged structures raise
:class:`cdp.errors.Corruption`; the record scan reports them per record instead.

Import from the modules: the package itself imports nothing, so that `cdpctl` (which
needs :mod:`~cdp.ntfs.names` only) does not load the parser and numpy.
"""
