"""ztunnel's DNS proxy: what a captured pod's port-53 queries reach on 15053 inside its netns.

`resolver.py` answers from the xDS state (pure), `forwarder.py` sends everything else to the node's
resolvers, `server.py` serves one pod's UDP and TCP sockets. Below inpod/; beside proxy/.
"""
