"""Block-ordered delta maps over a time-ordered journal (pure data structures and files).

Never imports :mod:`cdp`; the journal location of an extent is an opaque integer here.
"""
