"""cdp: a continuous data protection appliance.

Every write of a protected volume is appended to a journal; block-ordered delta maps
(:mod:`mapengine`) make any point in time readable, rewindable and exportable.
"""

__version__ = "0.1.0"
