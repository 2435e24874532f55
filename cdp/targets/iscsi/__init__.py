"""iSCSI target (RFC 7143) over the same BlockDevice / ExportProvider as NBD.

See docs/ISCSI.md. Modules: ``pdu`` (codec), ``core`` (sans-I/O login/session state
machine), ``scsi`` (SPC-4/SBC-3 emulation), ``naming`` (export <-> IQN), ``server``
(asyncio pump), ``thread`` (a server in a background thread for tests).
"""
