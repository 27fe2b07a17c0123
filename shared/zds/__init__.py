"""ZDS: the node agent <-> ztunnel protocol (codec, session state machines, Trio transport)."""
