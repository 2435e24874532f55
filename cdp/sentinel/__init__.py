"""The ransomware sentinel: block evidence of encryption in the write stream, alerts,
and the clean point before the first suspicious write (docs/SENTINEL.md).

``signals`` (pure: entropy, the overwrite verdict), ``detector`` (pure: buckets,
baseline, score, burst), ``service`` (the :class:`~cdp.volume.VolumeService`).
"""
