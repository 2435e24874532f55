"""Retention: fade out old history by policy and give the journal space back (see
docs/RETENTION.md).

Modules: :mod:`~cdp.retention.policy` (which points a policy keeps; pure),
:mod:`~cdp.retention.service` (:class:`~cdp.retention.service.Retention`, the per-volume
service: expired points, store cap, gc and compaction) and :mod:`~cdp.ops.retention`
(the cdpctl operations).
"""
