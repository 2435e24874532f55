"""Replication of a volume's journal to a second appliance (docs/REPLICATION.md).

Rooms: ``protocol`` (the sans-I/O wire protocol and its handshake).
"""
