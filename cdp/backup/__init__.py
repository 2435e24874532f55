"""Changed-block tracking and differential backups between any two points.

- :mod:`cdp.backup.changes`: which byte ranges differ between two points, and what they
  hold at the target point (data from a journal record, or zeroes);
- :mod:`cdp.backup.qcow2`: a qcow2 (v3) overlay holding only the changed clusters;
- :mod:`cdp.backup.cdpdiff`: the ``.cdpdiff`` stream of changed extents, and applying it;
- :mod:`cdp.backup.sinks`: where changed extents are written (raw files, NBD servers);
- :mod:`cdp.ops.backup`: the ``changed`` and ``export_diff`` operations behind cdpctl.

See docs/BACKUP.md for the user's view and docs/FORMATS.md (".cdpdiff stream") for the stream.
"""
