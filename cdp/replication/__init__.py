"""Replication of a volume's journal to a second appliance (docs/REPLICATION.md).

Rooms: ``protocol`` (the sans-I/O wire protocol and its handshake), ``source`` (the
volume service that ships the journal), ``target`` (the pump that applies a stream to a
replica volume), ``role`` (the replica's role file, which the exports read without
importing the pump).
"""
