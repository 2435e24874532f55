"""The file-version catalog: every marker updates a key/value catalog of the NTFS and
ext2/3/4 files on the volume from an MFT or inode/directory diff (see docs/FILES.md and
docs/FORMATS.md ("File catalog")).

Modules: :mod:`~cdp.catalog.model` (entries), :mod:`~cdp.catalog.rules` (the version
rules, pure), :mod:`~cdp.catalog.db` (SQLite), :mod:`~cdp.catalog.indexer` (probing,
full index, MFT diff, point-in-time views), :mod:`~cdp.catalog.ext4index` (the ext2/3/4
inode and directory diff), :mod:`~cdp.catalog.service` (the marker hook) and
:mod:`~cdp.ops.catalog` (the cdpctl operations).
"""
